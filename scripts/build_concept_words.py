"""Build captioner/concept_words.tsv: each ImageNet class -> the plain word a caption would use.

    python scripts/build_concept_words.py --captions DATA/coco-text/captions.tsv DATA/flickr8k/Flickr8k.token.txt

The class names come from torchvision (its weights' metadata, no download), in the order of the
ImageNet-1k heads of EfficientNet-Lite and torchvision's models. A class maps to, in order:
1. its group (118 dog breeds -> dog, domestic cats -> cat, birds -> bird, ...), or a hand-written
   list of candidates (espresso -> coffee, airliner -> airplane | plane); among candidates the
   one people write most often in the given captions wins;
2. otherwise its head noun (the last word of the name: "sports car" -> car), if captions use it;
3. otherwise nothing: a class no caption would name ("Gila monster") gives no tag.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "captioner" / "concept_words.tsv"
MIN_COUNT = 5  # a word captions use fewer times than this is not a caption word

GROUPS = {  # inclusive ranges of ImageNet class indices
    "fish": [(0, 6), (389, 397)],
    "bird": [(7, 24), (80, 100), (127, 146)],
    "lizard": [(38, 48)],
    "snake": [(52, 68)],
    "spider": [(72, 77)],
    "dog": [(151, 268)],
    "cat": [(281, 285)],
    "bear": [(294, 297)],
    "monkey": [(369, 382)],
    "butterfly": [(321, 326)],
}
BIRD_NAMES_KEPT = {"ostrich", "peacock", "flamingo", "pelican", "goose", "swan", "eagle", "owl", "penguin",
                   "duck", "hen", "cock", "vulture", "parrot"}  # birds captions name as themselves

CANDIDATES = {  # class name -> words a caption would use for it, in order of preference on a tie
    "cock": ["chicken", "rooster"], "hen": ["chicken"], "drake": ["duck"], "black swan": ["swan"],
    "king penguin": ["penguin"], "bald eagle": ["eagle"], "great grey owl": ["owl"], "macaw": ["parrot", "bird"],
    "African grey": ["parrot", "bird"], "kite": ["bird"], "crane bird": ["bird"],
    "tusker": ["elephant"], "Indian elephant": ["elephant"], "African elephant": ["elephant"],
    "ice bear": ["bear"], "sorrel": ["horse"], "ox": ["cow", "cattle"], "water buffalo": ["buffalo", "cow"],
    "ram": ["sheep"], "bighorn": ["sheep"], "hog": ["pig"], "wild boar": ["pig"], "Arabian camel": ["camel"],
    "hippopotamus": ["hippo", "hippopotamus"], "giant panda": ["panda", "bear"], "lesser panda": ["panda"],
    "timber wolf": ["wolf"], "white wolf": ["wolf"], "red wolf": ["wolf"], "red fox": ["fox"],
    "Arctic fox": ["fox"], "grey fox": ["fox"], "kit fox": ["fox"], "wood rabbit": ["rabbit"], "hare": ["rabbit"],
    "Angora": ["rabbit"], "fox squirrel": ["squirrel"], "Madagascar cat": ["lemur"],
    "sea lion": ["seal"], "grey whale": ["whale"], "killer whale": ["whale"], "loggerhead": ["turtle"],
    "leatherback turtle": ["turtle"], "mud turtle": ["turtle"], "terrapin": ["turtle"], "box turtle": ["turtle"],
    "American alligator": ["alligator", "crocodile"], "African crocodile": ["crocodile", "alligator"],
    "espresso": ["coffee"], "espresso maker": ["coffee"], "coffee mug": ["cup", "mug"], "coffeepot": ["coffee"],
    "cup": ["cup"], "eggnog": ["drink", "cup"], "red wine": ["wine"], "beer glass": ["beer"], "beer bottle": ["beer", "bottle"],
    "wine bottle": ["wine", "bottle"], "pop bottle": ["bottle"], "water bottle": ["bottle"], "water jug": ["jug"],
    "cheeseburger": ["burger", "hamburger", "sandwich"], "hotdog": ["hot dog"], "French loaf": ["bread"],
    "meat loaf": ["meat"], "carbonara": ["pasta"], "potpie": ["pie"], "consomme": ["soup"], "hot pot": ["soup"],
    "trifle": ["dessert", "cake"], "ice cream": ["ice cream"], "ice lolly": ["popsicle"], "Granny Smith": ["apple"],
    "mashed potato": ["potatoes", "potato"], "head cabbage": ["cabbage"], "spaghetti squash": ["squash"],
    "acorn squash": ["squash"], "butternut squash": ["squash"], "bell pepper": ["peppers", "pepper"],
    "chocolate sauce": ["chocolate"], "dough": ["dough", "bread"], "plate": ["plate"], "soup bowl": ["bowl"],
    "mixing bowl": ["bowl"], "Dutch oven": ["pot"], "Crock Pot": ["pot"], "frying pan": ["pan"], "wok": ["pan"],
    "caldron": ["pot"], "wooden spoon": ["spoon"], "plate rack": ["dishes", "rack"], "waffle iron": ["waffle"],
    "studio couch": ["couch", "sofa"], "four-poster": ["bed"], "quilt": ["bed", "blanket"], "crib": ["crib", "bed"],
    "cradle": ["crib"], "bassinet": ["crib"], "dining table": ["table"], "desk": ["desk"], "rocking chair": ["chair"],
    "folding chair": ["chair"], "barber chair": ["chair"], "throne": ["chair"], "park bench": ["bench"],
    "washbasin": ["sink"], "tub": ["bathtub", "tub"], "bathtub": ["bathtub", "tub"], "toilet seat": ["toilet"],
    "toilet tissue": ["toilet"], "shower curtain": ["shower"], "medicine chest": ["cabinet"],
    "china cabinet": ["cabinet"], "chiffonier": ["dresser"], "wardrobe": ["closet"], "entertainment center": ["tv", "television"],
    "home theater": ["tv", "television"], "television": ["tv", "television"], "monitor": ["computer", "monitor"],
    "screen": ["computer", "monitor"], "desktop computer": ["computer"], "notebook": ["laptop"], "laptop": ["laptop"],
    "hand-held computer": ["phone"], "cellular telephone": ["phone"], "dial telephone": ["phone"], "pay-phone": ["phone"],
    "computer keyboard": ["keyboard"], "space bar": ["keyboard"], "typewriter keyboard": ["keyboard"],
    "mouse": ["mouse"], "remote control": ["remote"], "refrigerator": ["refrigerator", "fridge"],
    "microwave": ["microwave"], "stove": ["stove", "oven"], "rotisserie": ["oven"], "toaster": ["toaster"],
    "dishwasher": ["dishwasher"], "washer": ["washer"], "table lamp": ["lamp"], "lampshade": ["lamp"],
    "analog clock": ["clock"], "wall clock": ["clock"], "digital clock": ["clock"], "vase": ["vase", "flowers"],
    "pot": ["plant", "pot"], "bookcase": ["books", "bookshelf"], "library": ["books"], "bookshop": ["books"],
    "book jacket": ["book"], "comic book": ["book"], "teddy": ["teddy bear"], "umbrella": ["umbrella"],
    "street sign": ["sign"], "traffic light": ["traffic light"], "parking meter": ["parking meter"],
    "school bus": ["bus"], "trolleybus": ["bus"], "minibus": ["bus"], "passenger car": ["train"],
    "electric locomotive": ["train"], "steam locomotive": ["train"], "bullet train": ["train"], "freight car": ["train"],
    "streetcar": ["trolley", "train"], "cab": ["taxi", "cab"], "sports car": ["car"], "convertible": ["car"],
    "racer": ["car"], "beach wagon": ["car"], "limousine": ["limousine", "car"], "Model T": ["car"], "jeep": ["jeep", "car"],
    "minivan": ["van"], "police van": ["van"], "moving van": ["truck", "van"], "pickup": ["truck"],
    "trailer truck": ["truck"], "tow truck": ["truck"], "fire engine": ["fire truck", "truck"], "garbage truck": ["truck"],
    "recreational vehicle": ["rv", "camper"], "car wheel": ["car"], "grille": ["car"], "car mirror": ["car"],
    "airliner": ["airplane", "plane", "jet"], "warplane": ["jet", "plane"], "wing": ["airplane", "plane"],
    "airship": ["blimp"], "space shuttle": ["shuttle", "rocket"], "missile": ["rocket"], "projectile": ["rocket"],
    "mountain bike": ["bike", "bicycle"], "bicycle-built-for-two": ["bike", "bicycle"], "tricycle": ["tricycle"],
    "moped": ["scooter", "motorcycle"], "motor scooter": ["scooter", "motorcycle"], "crash helmet": ["motorcycle", "helmet"],
    "speedboat": ["boat"], "canoe": ["canoe", "boat"], "yawl": ["sailboat", "boat"], "schooner": ["sailboat", "boat"],
    "catamaran": ["boat"], "trimaran": ["boat"], "fireboat": ["boat"], "lifeboat": ["boat"], "gondola": ["boat"],
    "container ship": ["ship"], "liner": ["ship"], "aircraft carrier": ["ship"], "submarine": ["submarine"],
    "paddlewheel": ["boat"], "dock": ["dock", "boat"], "pier": ["pier"], "snowmobile": ["snowmobile"],
    "dogsled": ["sled"], "bobsled": ["sled"], "ski": ["skis", "ski"], "soccer ball": ["soccer", "ball"],
    "tennis ball": ["tennis"], "racket": ["racket", "racquet"], "golf ball": ["golf"], "rugby ball": ["rugby", "ball"],
    "ping-pong ball": ["ball"], "croquet ball": ["ball"], "ballplayer": ["player", "baseball"], "groom": ["man"],
    "scuba diver": ["diver"], "seashore": ["beach"], "sandbar": ["beach"], "lakeside": ["lake"], "alp": ["mountain", "mountains"],
    "promontory": ["cliff"], "volcano": ["mountain"], "coral reef": ["reef", "ocean"], "breakwater": ["pier"],
    "jersey": ["shirt"], "sweatshirt": ["shirt"], "jean": ["jeans"], "suit": ["suit"], "Windsor tie": ["tie"],
    "bow tie": ["tie"], "running shoe": ["shoes"], "Loafer": ["shoes"], "clog": ["shoes"], "cowboy boot": ["boots"],
    "cowboy hat": ["hat"], "sombrero": ["hat"], "sunglass": ["sunglasses"], "backpack": ["backpack"],
    "purse": ["purse"], "mailbag": ["bag"], "plastic bag": ["bag"], "shopping basket": ["basket"], "hamper": ["basket"],
    "shopping cart": ["cart"], "ashcan": ["trash"], "mailbox": ["mailbox"], "fountain": ["fountain"],
    "grocery store": ["store", "market"], "butcher shop": ["store"], "shoe shop": ["store"], "toyshop": ["store"],
    "tobacco shop": ["store"], "restaurant": ["restaurant"], "bakery": ["bakery"], "confectionery": ["store"],
    "menu": ["menu"], "pizza": ["pizza"], "banana": ["banana", "bananas"], "orange": ["orange", "oranges"],
    "acoustic guitar": ["guitar"], "electric guitar": ["guitar"], "grand piano": ["piano"], "upright": ["piano"],
    "web site": [], "envelope": [], "crossword puzzle": [], "jigsaw puzzle": [], "maze": [], "ear": ["corn"],
    "hip": [], "tick": [], "file": [], "rule": [], "iron": [], "switch": [], "pole": ["pole"], "pick": [], "bow": [],
    "stole": [], "velvet": [], "wool": [], "chain": [], "knot": [], "nail": [], "screw": [], "hook": [], "mask": [],
    "crane": ["crane"], "chime": [], "brass": [], "bubble": [], "sock": [],
    # names whose head noun means something else in a caption ("CD player" is no player)
    "Band Aid": [], "cash machine": [], "cassette player": ["radio"], "CD player": ["radio"], "tape player": ["radio"],
    "hen-of-the-woods": ["mushroom"], "walking stick": [], "sea cucumber": [], "guinea pig": [], "mobile home": [],
    "milk can": [], "hair slide": [], "half track": [], "horizontal bar": [], "parallel bars": [], "disk brake": [],
    "face powder": [], "manhole cover": [], "piggy bank": [], "safety pin": [], "potter's wheel": [],
    "feather boa": [], "hard disc": ["computer"], "drilling platform": [], "gas pump": [], "Petri dish": [],
    "solar dish": [], "knee pad": [], "carpenter's kit": [], "seat belt": ["car"], "soap dispenser": ["sink"],
    "spider web": [], "window screen": ["window"], "fire screen": [], "window shade": ["window"], "pajama": [],
    "radio telescope": [], "vault": [], "maillot tank suit": [], "plane": [], "iPod": [], "tank": [],
    "spotlight": [], "scale": [], "French horn": [], "whistle": [], "wig": [], "mosquito net": [], "muzzle": [],
    "chest": [], "pitcher": ["jug", "vase"], "cloak": [], "academic gown": ["gown"], "pirate": [],
    "zucchini": ["vegetables"], "artichoke": ["vegetables"], "cardoon": ["vegetables"], "pomegranate": ["fruit"],
    "fig": ["fruit"], "jackfruit": ["fruit"], "custard apple": ["fruit"], "daisy": ["flowers", "flower"],
    "rapeseed": ["field", "flowers"], "yellow lady's slipper": ["flower"], "sandal": ["shoes"],
    "golfcart": ["cart"], "oxcart": ["cart"], "jinrikisha": ["cart"], "barrow": ["cart"], "lawn mower": ["lawn"],
    "harvester": ["tractor"], "thresher": ["tractor"], "snowplow": ["truck"], "forklift": ["truck"],
    "dumbbell": ["weights"], "barbell": ["weights"], "ladle": ["spoon"], "cleaver": ["knife"],
    "goblet": ["glass", "wine"], "rifle": ["gun"], "assault rifle": ["gun"], "revolver": ["gun"],
    "loudspeaker": ["speaker"], "joystick": ["controller"], "cinema": ["theater"], "flagpole": ["flag"],
    "teapot": ["tea", "pot"], "pretzel": ["pretzel", "bread"], "guacamole": ["food"],
}


def imagenet_classes() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.DEFAULT.meta["categories"])


def caption_word_counts(paths: list[Path]) -> Counter:
    counts: Counter = Counter()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            words = re.findall(r"[a-z]+", line.rsplit("\t", 1)[-1].lower())
            counts.update(words)
            counts.update(f"{a} {b}" for a, b in zip(words, words[1:]))  # two-word names: "teddy bear"
    return counts


def group_of(index: int) -> str | None:
    for word, ranges in GROUPS.items():
        if any(low <= index <= high for low, high in ranges):
            return word
    return None


def concept_word(index: int, name: str, counts: Counter) -> str:
    used = lambda word: counts[word] >= MIN_COUNT  # noqa: E731
    head = re.split(r"[\s-]+", name.lower())[-1]
    group = group_of(index)
    if group == "bird" and head in BIRD_NAMES_KEPT and used(head) and name not in CANDIDATES:
        return head
    if name in CANDIDATES:
        candidates = [w for w in CANDIDATES[name] if used(w)]
        return max(candidates, key=lambda w: counts[w]) if candidates else ""
    if group:
        return group
    if used(name.lower()):
        return name.lower()
    return head if used(head) else ""


def build(caption_files: list[Path], out: Path = OUT) -> list[tuple[int, str, str]]:
    counts = caption_word_counts(caption_files)
    rows = [(i, name, concept_word(i, name, counts)) for i, name in enumerate(imagenet_classes())]
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "imagenet_class", "word"])
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", nargs="+", type=Path, required=True,
                        help="caption text files (one caption at the end of each tab-separated line)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = build(args.captions, args.out)
    named = [r for r in rows if r[2]]
    print(f"wrote {args.out}: {len(named)} of {len(rows)} classes name {len({r[2] for r in named})} words")


if __name__ == "__main__":
    main()
