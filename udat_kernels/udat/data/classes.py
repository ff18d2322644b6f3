"""The canonical 7-class expression order shared by every face data set."""

from __future__ import annotations

__all__ = ["EXPRESSIONS", "FER2013_TO_CANONICAL", "RAFDB_TO_CANONICAL", "folder_classes"]

EXPRESSIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")

# FER2013 emotion 0..6 = Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral.
FER2013_TO_CANONICAL = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}

# RAF-DB basic labels 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral.
RAFDB_TO_CANONICAL = {1: 5, 2: 2, 3: 1, 4: 3, 5: 4, 6: 0, 7: 6}

_ALIASES = {"angry": "anger", "anger": "anger", "disgust": "disgust", "disgusted": "disgust",
            "fear": "fear", "fearful": "fear", "happy": "happiness", "happiness": "happiness",
            "sad": "sadness", "sadness": "sadness", "surprise": "surprise",
            "surprised": "surprise", "neutral": "neutral"}


def folder_classes(names) -> tuple[tuple[str, ...], dict[str, int]]:
    """Class folders -> (class names, {folder: label}).

    When every folder is an expression (any common spelling: "happy", "Happiness", ...), the
    classes are the canonical seven, so a folder domain lines up with FER2013 and RAF-DB even when
    some expressions have no folder; otherwise the classes are the folders, sorted.
    """
    names = sorted(names)
    keys = [_ALIASES.get(n.lower()) for n in names]
    if names and all(keys) and len(set(keys)) == len(keys):
        return EXPRESSIONS, {n: EXPRESSIONS.index(k) for n, k in zip(names, keys)}
    return tuple(names), {n: i for i, n in enumerate(names)}
