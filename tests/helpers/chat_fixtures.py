"""Offline chat tokenizers for tests: real chat templates on a tiny byte-level BPE vocabulary.

Nothing here touches the network or the Hugging Face Hub. Each fixture builds a
:class:`transformers.PreTrainedTokenizerFast` in-process (a few milliseconds) from a byte-level BPE trained on a
small fixed English corpus (:data:`CORPUS`), so it is deterministic, can encode *any* text (byte fallback: every byte
has a token, there is no unknown token) and has a vocabulary small enough for a tiny model.

Import them from a test module as ``from tests.chat_fixtures import qwen3_tokenizer`` (``tests`` is a package).

========================  ============================================================  ==========================
fixture                   chat template                                                 special tokens (bos/eos/pad)
========================  ============================================================  ==========================
``qwen3_tokenizer``       Qwen3 (hybrid thinking, e.g. Qwen3-8B): ``<|im_start|>role\\n  bos None,
                          ...<|im_end|>\\n``; ``enable_thinking=False`` adds an empty       eos ``<|im_end|>``,
                          ``<think>\\n\\n</think>\\n\\n`` to the generation prompt; the     pad ``<|endoftext|>``
                          last assistant turn after the last user query gets a
                          ``<think>`` block, earlier ones lose it (not prefix-stable!)
``llama3_tokenizer``      Llama-3.1 Instruct: ``<|begin_of_text|>``, always a system     bos ``<|begin_of_text|>``,
                          block with "Cutting Knowledge Date: December 2023 / Today      eos ``<|eot_id|>``,
                          Date: 26 Jul 2024" (``date_string`` overrides), turns          pad ``<|finetune_right_pad_id|>``
                          ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``
                          with content trimmed
``smollm3_tokenizer``     SmolLM3 (approximation of the real one): ChatML markers, a     bos None,
                          system block with "## Metadata" (fixed "Today Date: 01 June    eos ``<|im_end|>``,
                          2025" instead of ``strftime_now``), "Reasoning Mode:           pad ``<|finetune_right_pad_id|>``
                          /think|/no_think", a default SmolLM system prompt;
                          assistant turns wrapped in ``{% generation %}`` (so
                          ``return_assistant_tokens_mask`` works)
``smollm2_tokenizer``     SmolLM2-Instruct ChatML with the default system prompt "You     bos ``<|im_start|>``,
                          are a helpful AI assistant named SmolLM, trained by Hugging     eos ``<|im_end|>``,
                          Face" when ``messages[0]`` is not a system message             pad ``<|im_end|>`` (== eos, as
                                                                                         in the real tokenizer)
``unstable_tokenizer``    deliberately NOT prefix-stable: the final assistant turn gets  bos ``<|bos|>``,
                          a " (final answer)" suffix and a trailer                       eos ``<|end|>``,
                          ``<|meta|>messages=N<|end|>\\n`` counts the messages            pad ``<|pad|>``
``plain_tokenizer``       same BPE, **no chat template** (for error paths)               bos/eos ``<|endoftext|>``,
                                                                                         pad ``<|pad|>``
========================  ============================================================  ==========================

Note: SmolLM3 is often described as "Llama-3 style" because its vocabulary is Llama-3's, but its chat template uses
``<|im_start|>``/``<|im_end|>`` markers; the Llama-3 header format is covered by ``llama3_tokenizer``.

Common properties of every fixture (checked in ``tests/chat/test_segments.py``):

* ``len(tok) == tok.vocab_size == VOCAB_SIZE`` (512): the special and added tokens live at the END of the model
  vocabulary (ids ``VOCAB_SIZE - n .. VOCAB_SIZE - 1``, as in real Qwen/Llama tokenizers), so a tiny model config can
  simply use ``vocab_size=len(tok)``; ids are stable from run to run.
* ``pad_token`` and ``eos_token`` are set; ``padding_side`` is ``"right"``; ``model_max_length`` is 4096.
* Special tokens (the markers above) are never split and are dropped by ``decode(..., skip_special_tokens=True)``;
  Qwen3's ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>``
  are added *non-special* tokens (kept when decoding), like in the real tokenizer.
* ``decode(encode(text))`` round-trips any text exactly; offsets (``return_offsets_mapping=True``) are character
  offsets into the input string.
* The pre-tokenizer is the Qwen2 / Llama-3 regex split + byte-level mapping, so e.g. ``"\\n\\n"`` is one pre-token and
  ``"assistant\\n"`` splits into ``"assistant"`` and ``"\\n"`` like in the real tokenizers.

Every fixture is cached (``functools.lru_cache``) and returns the SAME object on every call: do not mutate it in a
test (e.g. ``padding_side``); use ``copy.deepcopy(tok)`` first if you need to.
"""

from __future__ import annotations

import functools
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORPUS",
    "LLAMA3_CHAT_TEMPLATE",
    "QWEN3_CHAT_TEMPLATE",
    "SMOLLM2_CHAT_TEMPLATE",
    "SMOLLM3_CHAT_TEMPLATE",
    "UNSTABLE_CHAT_TEMPLATE",
    "VOCAB_SIZE",
    "llama3_tokenizer",
    "plain_tokenizer",
    "qwen3_tokenizer",
    "sample_conversation",
    "smollm2_tokenizer",
    "smollm3_tokenizer",
    "unstable_tokenizer",
]

VOCAB_SIZE = 512
"""Total vocabulary size of every fixture tokenizer (model vocabulary, special tokens included)."""

# Qwen2 / Llama-3 pre-tokenization regex.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS: tuple[str, ...] = (
    "system",
    "user",
    "assistant",
    "tool",
    "You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "## Metadata\n\nKnowledge Cutoff Date: June 2025\nToday Date: 01 June 2025\nReasoning Mode: /think\n\n",
    "## Custom Instructions\n\n",
    "Hello! How are you today? I am fine, thank you. What is your name? My name is Alice.",
    "Hi. I am Bob! Nice to meet you. Where do you live? I live in Paris, the capital of France.",
    "The quick brown fox jumps over the lazy dog. The dog did not move; it was sleeping.",
    "Please remember the following facts: my favourite colour is green, my cat is called Tom, "
    "and my phone number is 555-0199.",
    "What is the capital of Italy? The capital of Italy is Rome. What about Spain? It is Madrid.",
    "Can you help me write a short poem about the sea? Of course! Here is a short poem about the sea.",
    "I would like to book a table for two people at seven in the evening, please.",
    "Sure, I have booked a table for two at seven. Is there anything else I can help you with?",
    "Let me think about this problem step by step. First, we add the numbers. Then we divide the result.",
    "The answer is 42. The meeting is on Monday at 10 o'clock in room 3.",
    'She said: "I will be there." Then she left (without saying goodbye).',
    "Remember this: the secret code is blue seven. Do not forget it!",
    "Thank you very much for your help. You are welcome; have a great day.",
    "In the morning I drink coffee, and in the evening I read a book about history and science.",
    "My brother works as a teacher in a small school near the mountains.",
    "We visited the museum, the park and the old church during our summer holiday.",
    "Call the function with the following arguments and return the result as JSON.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "The weather in Paris is sunny with a temperature of 21 degrees.",
    "This is my final answer. messages=2 messages=3 messages=4 (final answer)",
)


def _train_byte_bpe(special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE with ``VOCAB_SIZE`` ids; ``special_tokens`` take the last ids, in order."""
    n_special = len(special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - n_special,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeating the corpus makes frequencies (and so the merges) well separated; the result is deterministic.
    # Role names are up-weighted so that they become single tokens, as in real vocabularies.
    tok.train_from_iterator(list(CORPUS) * 3 + ["system", "user", "assistant", "tool", "ipython"] * 12, trainer=trainer)
    state = json.loads(tok.to_str())
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    if len(vocab) > VOCAB_SIZE - n_special:  # pragma: no cover - guarded by the trainer
        raise RuntimeError("BPE trainer produced too many tokens")
    # Fill up to a fixed size with unused placeholder ids so every fixture has exactly VOCAB_SIZE ids.
    filler = 0
    while len(vocab) < VOCAB_SIZE - n_special:
        vocab[f"<|unused_{filler}|>"] = len(vocab)
        filler += 1
    for t in special_tokens:
        vocab[t] = len(vocab)
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = decoders.ByteLevel()
    return out


def _build(
    *,
    special: list[str],
    added: tuple[str, ...] = (),
    bos: str | None,
    eos: str,
    pad: str,
    chat_template: str | None,
) -> PreTrainedTokenizerFast:
    raw = _train_byte_bpe(list(special) + list(added))
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if added:
        raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    kwargs = {"eos_token": eos, "pad_token": pad}
    if bos is not None:
        kwargs["bos_token"] = bos
    extra = [t for t in special if t not in (bos, eos, pad)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        additional_special_tokens=extra,
        **kwargs,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    assert len(tok) == tok.vocab_size == VOCAB_SIZE, (len(tok), tok.vocab_size)
    return tok


# --------------------------------------------------------------------------------------------------------------------
# Chat templates (data: reproductions of the public templates, whitespace control included)
# --------------------------------------------------------------------------------------------------------------------

QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    "                {{- tool_call.name }}\n"
    '                {{- \'", "arguments": \' }}\n'
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)
"""Qwen3 (hybrid thinking models such as Qwen3-8B) chat template."""

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user "
    'message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
"""Llama-3.1 Instruct chat template (system block always present, content trimmed, tool results as ``ipython``)."""

_SMOLLM3_THINK_SYSTEM = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solution. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. Each "
    "step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion.\\n\\n"
)

SMOLLM3_CHAT_TEMPLATE = (
    "{# ───── defaults ───── #}\n"
    "{%- if enable_thinking is not defined -%}\n"
    "{%- set enable_thinking = true -%}\n"
    "{%- endif -%}\n"
    "\n"
    "{# ───── reasoning mode ───── #}\n"
    "{%- if enable_thinking -%}\n"
    '  {%- set reasoning_mode = "/think" -%}\n'
    "{%- else -%}\n"
    '  {%- set reasoning_mode = "/no_think" -%}\n'
    "{%- endif -%}\n"
    "\n"
    "{# ───── header (system message) ───── #}\n"
    '{{- "<|im_start|>system\\n" -}}\n'
    '{%- set system_message = "" -%}\n'
    '{%- set custom_instructions = "" -%}\n'
    '{%- if messages[0].role == "system" -%}\n'
    "  {%- set system_message = messages[0].content -%}\n"
    '  {%- if "/no_think" in system_message -%}\n'
    '    {%- set reasoning_mode = "/no_think" -%}\n'
    '  {%- elif "/think" in system_message -%}\n'
    '    {%- set reasoning_mode = "/think" -%}\n'
    "  {%- endif -%}\n"
    '  {%- set custom_instructions = system_message.replace("/no_think", "").replace("/think", "").rstrip() -%}\n'
    "{%- endif -%}\n"
    "\n"
    '{%- if "/system_override" in system_message -%}\n'
    '  {{- custom_instructions.replace("/system_override", "").rstrip() -}}\n'
    '  {{- "<|im_end|>\\n" -}}\n'
    "{%- else -%}\n"
    '  {{- "## Metadata\\n\\n" -}}\n'
    '  {{- "Knowledge Cutoff Date: June 2025\\n" -}}\n'
    '  {%- set today = "01 June 2025" -%}\n'
    '  {{- "Today Date: " ~ today ~ "\\n" -}}\n'
    '  {{- "Reasoning Mode: " + reasoning_mode + "\\n\\n" -}}\n'
    "\n"
    '  {{- "## Custom Instructions\\n\\n" -}}\n'
    "  {%- if custom_instructions -%}\n"
    '    {{- custom_instructions + "\\n\\n" -}}\n'
    '  {%- elif reasoning_mode == "/think" -%}\n'
    '    {{- "' + _SMOLLM3_THINK_SYSTEM + '" -}}\n'
    "  {%- else -%}\n"
    '    {{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n\\n" -}}\n'
    "  {%- endif -%}\n"
    "\n"
    "  {%- if tools -%}\n"
    '    {{- "### Tools\\n\\n" -}}\n'
    '    {{- "You may call one or more functions to assist with the user query.\\n" -}}\n'
    '    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n\\n<tools>\\n" -}}\n'
    "    {%- for tool in tools -%}\n"
    "      {{- tool | tojson -}}\n"
    '      {{- "\\n" -}}\n'
    "    {%- endfor -%}\n"
    '    {{- "</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call>\\n\\n" -}}\n'
    "  {%- endif -%}\n"
    '  {{- "<|im_end|>\\n" -}}\n'
    "{%- endif -%}\n"
    "\n"
    "{# ───── main loop ───── #}\n"
    "{%- for message in messages -%}\n"
    '    {%- set content = message.content if message.content is string else "" -%}\n'
    '    {%- if message.role == "user" -%}\n'
    '        {{ "<|im_start|>" + message.role + "\\n"  + content + "<|im_end|>\\n" }}\n'
    '    {%- elif message.role == "assistant" -%}\n'
    "        {% generation %}\n"
    '        {%- if reasoning_mode == "/think" -%}\n'
    '            {{ "<|im_start|>assistant\\n" + content.lstrip("\\n") + "<|im_end|>\\n" }}\n'
    "        {%- else -%}\n"
    '            {{ "<|im_start|>assistant\\n" + "<think>\\n\\n</think>\\n" + content.lstrip("\\n") + '
    '"<|im_end|>\\n" }}\n'
    "        {%- endif -%}\n"
    "        {% endgeneration %}\n"
    '    {%- elif message.role == "tool" -%}\n'
    '    {{ "<|im_start|>" + "user\\n"  + content + "<|im_end|>\\n" }}\n'
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "\n"
    "{# ───── generation prompt ───── #}\n"
    "{%- if add_generation_prompt -%}\n"
    '    {%- if reasoning_mode == "/think" -%}\n'
    '        {{ "<|im_start|>assistant\\n" }}\n'
    "    {%- else -%}\n"
    '        {{ "<|im_start|>assistant\\n" + "<think>\\n\\n</think>\\n" }}\n'
    "    {%- endif -%}\n"
    "{%- endif -%}\n"
)
"""SmolLM3 chat template, approximated: fixed "Today Date" (the real one calls ``strftime_now``), XML tools only."""

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)
"""SmolLM2-Instruct chat template (ChatML with a default system prompt)."""

UNSTABLE_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start|>' + message['role'] + '\\n' + message['content'] }}\n"
    "    {%- if loop.last and message['role'] == 'assistant' %}\n"
    "        {{- ' (final answer)' }}\n"
    "    {%- endif %}\n"
    "    {{- '<|end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{{- '<|meta|>messages=' + (messages | length | string) + '<|end|>\\n' }}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start|>assistant\\n' }}\n"
    "{%- endif %}"
)
"""A deliberately NOT prefix-stable template: rendering ``messages[:i+1]`` is not a prefix of rendering
``messages[:i+2]``, because the last assistant turn gets a `` (final answer)`` suffix and a trailer counts the
messages (``<|meta|>messages=N<|end|>``)."""


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3 tokenizer: special ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos); added non-special
    ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>``; no bos.
    Template: :data:`QWEN3_CHAT_TEMPLATE` (pass ``enable_thinking=False`` to ``apply_chat_template``)."""
    return _build(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


@functools.cache
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-3.1 Instruct tokenizer: special ``<|begin_of_text|>`` (bos), ``<|end_of_text|>``,
    ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (eos), ``<|eom_id|>``, ``<|python_tag|>``,
    ``<|finetune_right_pad_id|>`` (pad). Template: :data:`LLAMA3_CHAT_TEMPLATE` (renders the bos token itself, so
    tokenize renderings with ``add_special_tokens=False``)."""
    return _build(
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
            "<|finetune_right_pad_id|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


@functools.cache
def smollm3_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM3 tokenizer: special ``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|im_start|>``, ``<|im_end|>`` (eos),
    ``<|finetune_right_pad_id|>`` (pad); added non-special ``<think>``, ``</think>``, ``<tool_call>``,
    ``</tool_call>``; no bos. Template: :data:`SMOLLM3_CHAT_TEMPLATE` (``enable_thinking=False`` or ``/no_think`` in
    the system message selects the no-think mode)."""
    return _build(
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|finetune_right_pad_id|>"],
        added=("<think>", "</think>", "<tool_call>", "</tool_call>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|finetune_right_pad_id|>",
        chat_template=SMOLLM3_CHAT_TEMPLATE,
    )


@functools.cache
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2-Instruct tokenizer: special ``<|endoftext|>``, ``<|im_start|>`` (bos), ``<|im_end|>`` (eos AND pad,
    as in the real tokenizer). Template: :data:`SMOLLM2_CHAT_TEMPLATE`."""
    return _build(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|im_end|>",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    )


@functools.cache
def unstable_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose chat template is NOT prefix-stable (:data:`UNSTABLE_CHAT_TEMPLATE`): special ``<|bos|>``
    (bos), ``<|start|>``, ``<|end|>`` (eos), ``<|meta|>``, ``<|pad|>`` (pad)."""
    return _build(
        special=["<|bos|>", "<|start|>", "<|end|>", "<|meta|>", "<|pad|>"],
        bos="<|bos|>",
        eos="<|end|>",
        pad="<|pad|>",
        chat_template=UNSTABLE_CHAT_TEMPLATE,
    )


@functools.cache
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same byte-level BPE without any chat template: special ``<|endoftext|>`` (bos and eos), ``<|pad|>``
    (pad)."""
    return _build(
        special=["<|endoftext|>", "<|pad|>"],
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
        chat_template=None,
    )


def sample_conversation(*, system: bool = True) -> list[dict[str, str]]:
    """A small multi-turn conversation (system, then user/assistant turns with several sentences each).

    Returns a fresh list on every call. The facts in it (the cat Tom, the code "blue seven") make it usable as a toy
    memory task."""
    messages = [
        {"role": "user", "content": "Hi. I am Bob! Please remember this: my cat is called Tom."},
        {"role": "assistant", "content": "Nice to meet you, Bob. I will remember that your cat is called Tom."},
        {"role": "user", "content": "The secret code is blue seven.\n\nDo not forget it!"},
        {"role": "assistant", "content": "Sure; the code is blue seven. Anything else?"},
        {"role": "user", "content": "What is the name of my cat?"},
        {"role": "assistant", "content": "Your cat is called Tom."},
    ]
    if system:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return messages
