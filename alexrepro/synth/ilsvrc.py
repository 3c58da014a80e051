"""ILSVRC-2012's names and counts, as the synthetic downloads reproduce them (REFERENCE.md §5).

Standard library only: the configs and the evaluation's "is this the built-in sample?" read it without paying for
the image renderer.
"""

from __future__ import annotations

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MEMBER = f"{DEVKIT_DIR}/data/meta.mat"
GROUND_TRUTH_MEMBER = f"{DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt"

# Every tar member gets the same fixed metadata, so the archives are byte-identical for a seed.
# The time is 2012-05-02 (the ILSVRC-2012 release), which tools display without complaint, unlike 1970.
ARCHIVE_MTIME = 1335916800

# Field order of the real `synsets` struct array; torchvision's parser reads fields by position.
SYNSET_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)

# ILSVRC-2012's counts. The real training set's largest class has 1300 images.
ILSVRC_CLASSES = 1000
ILSVRC_TRAIN_IMAGES = 1_281_167
ILSVRC_MIN_PER_CLASS = 732
ILSVRC_MAX_PER_CLASS = 1300
ILSVRC_VAL_PER_CLASS = 50
MAX_TRAIN_PER_CLASS = ILSVRC_MAX_PER_CLASS
MAX_VAL_PER_CLASS = 1000

# The built-in sample's classes: one WNID per pattern drawn by alexrepro.synth.sample, in ILSVRC2012_ID order. The
# WNIDs are chosen so that sorted WNID order differs from ID order for any number of classes, as in the real
# devkit. Kept apart from the drawing code so that what names the classes changes only when the names do.
PATTERN_WNIDS = {
    "stripes": "n27304915",
    "star": "n21846023",
    "checkerboard": "n25519360",
    "cross": "n29061487",
    "rings": "n23178542",
    "triangle": "n20457391",
    "dots": "n28840216",
    "disk": "n22638104",
    "grid": "n26093874",
    "zigzag": "n24972618",
    "crescent": "n29527703",
    "spiral": "n20119465",
    "square": "n25846611",
    "waves": "n28215379",
    "annulus": "n23624097",
    "arrow": "n26780532",
}
PATTERN_COUNT = len(PATTERN_WNIDS)


def is_builtin_sample(wnids: set[str]) -> bool:
    """True when every class is one of the built-in sample's (they start with n2: never a real WordNet synset)."""
    return bool(wnids) and wnids <= set(PATTERN_WNIDS.values())
