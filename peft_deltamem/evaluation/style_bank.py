"""The questions of the working-style family (ladder levels 6 and 7) and the answers a training target is made from.

Each item is an everyday question that has nothing to do with any preference (no language, word count, capitals,
list or form of address in it: a test checks this), with the pieces an answer in any style is composed of
(:func:`peft_deltamem.evaluation.style.style_answer`), in English and in French:

* ``word``: a one-word answer (English only: "one word" and "in French" are never asked together);
* ``short``: at most 4 words (what a "no more than N words" answer says, N >= 4);
* ``sentence``: one plain sentence of at least 9 words (the answer with no preference: it follows none of them);
* ``points``: two short items (a bulleted answer).

The split is fixed: 14 questions for training, 6 held out for testing, so a test conversation always asks a question
the adapter never saw answered in any style.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StyleItem:
    """One question and the pieces of its answers (see the module docstring)."""

    question: str
    word: str
    short: dict[str, str]
    sentence: dict[str, str]
    points: dict[str, tuple[str, str]]


def _item(question: str, word: str, en: tuple[str, str, tuple[str, str]], fr: tuple[str, str, tuple[str, str]]):
    return StyleItem(
        question=question,
        word=word,
        short={"en": en[0], "fr": fr[0]},
        sentence={"en": en[1], "fr": fr[1]},
        points={"en": en[2], "fr": fr[2]},
    )


_ITEMS: tuple[StyleItem, ...] = (
    _item(
        "What can I do with leftover rice?",
        "Fry",
        ("Make fried rice.", "You can turn leftover rice into fried rice with some vegetables and an egg.",
         ("Fry it with vegetables", "Bake a rice pudding")),
        ("Faites du riz sauté.", "Vous pouvez transformer le riz restant en riz sauté avec des légumes et un œuf.",
         ("Faites-le sauter avec des légumes", "Préparez un riz au lait")),
    ),
    _item(
        "How can I save money on groceries?",
        "Plan",
        ("Plan meals ahead.", "Plan your meals for the week and buy only what is on your shopping list.",
         ("Plan your meals ahead", "Buy store brands")),
        ("Prévoyez vos repas.", "Planifiez vos repas de la semaine et achetez seulement ce qui est sur votre liste.",
         ("Planifiez vos repas à l'avance", "Achetez les marques du magasin")),
    ),
    _item(
        "What is a good way to relax after work?",
        "Walk",
        ("Take a walk.", "A short walk outside followed by a warm shower helps most people unwind after work.",
         ("Take a short walk", "Listen to calm music")),
        ("Faites une promenade.",
         "Une courte promenade dehors puis une douche chaude aident la plupart des gens à se détendre.",
         ("Faites une courte promenade", "Écoutez de la musique calme")),
    ),
    _item(
        "How do I keep my houseplants healthy?",
        "Light",
        ("Give them light.", "Give your plants enough light and water them only when the soil is dry.",
         ("Give them enough light", "Water only when dry")),
        ("Donnez-leur de la lumière.",
         "Donnez assez de lumière à vos plantes et arrosez-les seulement quand la terre est sèche.",
         ("Donnez-leur assez de lumière", "Arrosez seulement quand la terre est sèche")),
    ),
    _item(
        "What should I bring to a picnic?",
        "Sandwiches",
        ("Sandwiches and fruit.", "Bring sandwiches, fresh fruit, plenty of water and a blanket to sit on.",
         ("Sandwiches and fresh fruit", "A blanket and water")),
        ("Sandwichs et fruits.",
         "Apportez des sandwichs, des fruits frais, beaucoup d'eau et une couverture pour vous asseoir.",
         ("Des sandwichs et des fruits frais", "Une couverture et de l'eau")),
    ),
    _item(
        "How can I improve my handwriting?",
        "Practise",
        ("Practise slowly every day.", "Write slowly, hold the pen loosely and practise a few lines every day.",
         ("Write slowly and carefully", "Practise a little daily")),
        ("Entraînez-vous chaque jour.",
         "Écrivez lentement, tenez le stylo sans serrer et entraînez-vous quelques lignes chaque jour.",
         ("Écrivez lentement et soigneusement", "Entraînez-vous un peu chaque jour")),
    ),
    _item(
        "What is a fun activity for a rainy afternoon?",
        "Baking",
        ("Bake some cookies.", "Baking cookies or playing a board game is a cosy way to spend a rainy afternoon.",
         ("Bake some cookies", "Play a board game")),
        ("Faites des biscuits.",
         "Faire des biscuits ou jouer à un jeu de société est une belle façon de passer un après-midi pluvieux.",
         ("Faites des biscuits", "Jouez à un jeu de société")),
    ),
    _item(
        "How do I get rid of fruit flies?",
        "Vinegar",
        ("Use a vinegar trap.", "Set a small bowl of vinegar with a drop of soap near the fruit to trap them.",
         ("Set a vinegar trap", "Keep the fruit covered")),
        ("Un piège au vinaigre.",
         "Posez un petit bol de vinaigre avec une goutte de savon près des fruits pour les piéger.",
         ("Posez un piège au vinaigre", "Couvrez les fruits")),
    ),
    _item(
        "What makes a good cover letter?",
        "Clarity",
        ("Clear, specific and brief.",
         "A good cover letter is short, specific about the job and shows why you are a good fit.",
         ("Keep it short", "Match it to the job")),
        ("Claire, précise et brève.",
         "Une bonne lettre de motivation est courte, précise sur le poste et montre pourquoi vous convenez.",
         ("Restez bref", "Adaptez la lettre au poste")),
    ),
    _item(
        "How can I make my bike ride smoother?",
        "Tyres",
        ("Check the tyre pressure.", "Pump your tyres to the right pressure and keep the chain clean and oiled.",
         ("Pump up the tyres", "Oil the chain")),
        ("Gonflez bien les pneus.", "Gonflez vos pneus à la bonne pression et gardez la chaîne propre et huilée.",
         ("Gonflez les pneus", "Huilez la chaîne")),
    ),
    _item(
        "What is a simple way to start saving energy at home?",
        "Unplug",
        ("Switch off unused devices.", "Switch off devices you are not using and turn the heating down by one degree.",
         ("Switch off unused devices", "Lower the heating a little")),
        ("Éteignez les appareils inutilisés.",
         "Éteignez les appareils que vous n'utilisez pas et baissez le chauffage d'un degré.",
         ("Éteignez les appareils inutilisés", "Baissez un peu le chauffage")),
    ),
    _item(
        "How do I choose a good watermelon?",
        "Weight",
        ("Pick a heavy one.", "Choose a watermelon that feels heavy for its size and has a creamy yellow spot.",
         ("Pick a heavy one", "Look for a yellow spot")),
        ("Choisissez une pastèque lourde.",
         "Choisissez une pastèque qui semble lourde pour sa taille et qui a une tache jaune.",
         ("Prenez une pastèque lourde", "Cherchez une tache jaune")),
    ),
    _item(
        "What can I do to concentrate better while studying?",
        "Breaks",
        ("Take regular breaks.", "Put your phone in another room and study in short blocks with regular breaks.",
         ("Put your phone away", "Take regular breaks")),
        ("Faites des pauses régulières.",
         "Mettez votre téléphone dans une autre pièce et étudiez par courtes périodes avec des pauses.",
         ("Rangez votre téléphone", "Faites des pauses régulières")),
    ),
    _item(
        "How do I make my shoes last longer?",
        "Rotate",
        ("Alternate between pairs.", "Let your shoes dry between wears, clean them often and alternate two pairs.",
         ("Let them dry out", "Alternate two pairs")),
        ("Alternez entre deux paires.",
         "Laissez sécher vos chaussures entre deux sorties, nettoyez-les souvent et alternez deux paires.",
         ("Laissez-les sécher", "Alternez deux paires")),
    ),
    # ----------------------------------------------------------------------------- held out: the test split
    _item(
        "What is a good gift for a neighbour?",
        "Cookies",
        ("Homemade cookies.", "A jar of homemade cookies or a small potted herb makes a friendly gift for a neighbour.",
         ("Homemade cookies", "A small potted herb")),
        ("Des biscuits maison.",
         "Un bocal de biscuits maison ou une petite plante aromatique est un cadeau sympathique pour un voisin.",
         ("Des biscuits maison", "Une petite plante aromatique")),
    ),
    _item(
        "How can I keep my desk tidy?",
        "Declutter",
        ("Clear it every evening.",
         "Spend two minutes every evening putting things away and keep only what you use daily on the desk.",
         ("Clear it every evening", "Keep only daily items")),
        ("Rangez-le chaque soir.",
         "Prenez deux minutes chaque soir pour ranger et gardez seulement les objets utiles sur le bureau.",
         ("Rangez-le chaque soir", "Gardez seulement l'essentiel")),
    ),
    _item(
        "What should I do if my phone battery drains quickly?",
        "Brightness",
        ("Lower the screen brightness.",
         "Lower the screen brightness, close apps you are not using and turn off location services.",
         ("Lower the brightness", "Close unused apps")),
        ("Baissez la luminosité.",
         "Baissez la luminosité de l'écran, fermez les applications inutiles et désactivez la localisation.",
         ("Baissez la luminosité", "Fermez les applications inutiles")),
    ),
    _item(
        "How do I start running as a beginner?",
        "Slowly",
        ("Start slow and short.",
         "Alternate a minute of running with a minute of walking and add a little more each week.",
         ("Alternate running and walking", "Add a little each week")),
        ("Commencez doucement.",
         "Alternez une minute de course et une minute de marche, puis augmentez un peu chaque semaine.",
         ("Alternez course et marche", "Augmentez un peu chaque semaine")),
    ),
    _item(
        "What is an easy way to learn to cook?",
        "Recipes",
        ("Follow simple recipes.",
         "Start with a few simple recipes you enjoy and cook each one several times until it feels easy.",
         ("Follow simple recipes", "Repeat your favourites")),
        ("Suivez des recettes simples.",
         "Commencez par quelques recettes simples que vous aimez et refaites chacune plusieurs fois.",
         ("Suivez des recettes simples", "Refaites vos plats préférés")),
    ),
    _item(
        "How can I make a small room look bigger?",
        "Mirrors",
        ("Use mirrors and light.",
         "Hang a large mirror, use pale paint on the walls and keep the floor as clear as possible.",
         ("Hang a large mirror", "Use pale paint")),
        ("Utilisez des miroirs.",
         "Accrochez un grand miroir, choisissez une peinture claire pour les murs et dégagez le sol.",
         ("Accrochez un grand miroir", "Choisissez une peinture claire")),
    ),
)  # fmt: skip

_N_TRAIN = 14

STYLE_ITEMS: dict[str, tuple[StyleItem, ...]] = {"train": _ITEMS[:_N_TRAIN], "test": _ITEMS[_N_TRAIN:]}
"""The questions of each split; train and test share none."""

__all__ = ["STYLE_ITEMS", "StyleItem"]
