"""Cleaning steps: normalise the text, drop empty and duplicate (exact or near) examples; then balance the
labels, split train/eval stratified, and weight the sources of the train split, all seeded."""

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import replace

from tuneline.data.formats import Example
from tuneline.data.tokens import Encoded
from tuneline.errors import TunelineError
from tuneline.params import Source


def _normalise_text(text: str) -> str:
    """Unicode NFC, \\n line ends, no trailing blanks on a line or around the text. Inner spacing stays
    (indentation matters in code)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def normalise(example: Example) -> Example:
    messages = [
        {**message, **{key: _normalise_text(message[key]) for key in ("content", "input") if key in message}}
        for message in example.messages
    ]
    return replace(example, messages=messages)


def is_empty(example: Example) -> bool:
    return any(not message["content"] for message in example.messages)


def exact_key(example: Example) -> str:
    return json.dumps(example.messages, sort_keys=True, ensure_ascii=False)


def near_key(example: Example) -> str:
    """The conversation lowercased, punctuation and spacing removed, hashed: near-identical rows collide."""
    text = "\x00".join(f"{m['role']}:{m['content']}:{m.get('input', '')}" for m in example.messages)
    return hashlib.sha256(" ".join(re.sub(r"[\W_]+", " ", text.lower()).split()).encode()).hexdigest()


def drop_duplicates(examples: list[Example], key: Callable[[Example], str]) -> tuple[list[Example], list[Example]]:
    """Keep the first example of each key; return (kept, dropped)."""
    seen: set[str] = set()
    kept, dropped = [], []
    for example in examples:
        (dropped if key(example) in seen else kept).append(example)
        seen.add(key(example))
    return kept, dropped


def balance_labels(examples: list[Encoded], seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """Within each source, downsample every label to the count of its rarest one; return (kept, dropped)."""
    rng = random.Random(seed)
    groups: dict[int, dict[str, list[int]]] = {}
    for position, encoded in enumerate(examples):
        if encoded.example.label is not None:
            groups.setdefault(encoded.example.source, {}).setdefault(encoded.example.label, []).append(position)
    dropped: set[int] = set()
    for source in sorted(groups):
        smallest = min(map(len, groups[source].values()))
        for label in sorted(groups[source]):
            members = groups[source][label]
            dropped.update(rng.sample(members, len(members) - smallest))
    return _partition_positions(examples, dropped)


def _partition_positions(examples: list[Encoded], positions: set[int]) -> tuple[list[Encoded], list[Encoded]]:
    """(the examples not at `positions`, those at them), each in the original order."""
    return (
        [e for i, e in enumerate(examples) if i not in positions],
        [e for i, e in enumerate(examples) if i in positions],
    )


def stratified_split(examples: list[Encoded], eval_fraction: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """Split each (source, label) group by itself, so both splits keep the mix; original order kept.

    The eval split gets round(total * eval_fraction) examples, shared out by largest remainder (rounding
    each small group alone could put every example, or none, into eval)."""
    rng = random.Random(seed)
    groups: dict[tuple[int, str | None], list[int]] = {}
    for position, encoded in enumerate(examples):
        groups.setdefault((encoded.example.source, encoded.example.label), []).append(position)
    keys = sorted(groups, key=str)
    shares = {key: len(groups[key]) * eval_fraction for key in keys}
    sizes = {key: int(share) for key, share in shares.items()}
    remainder = round(len(examples) * eval_fraction) - sum(sizes.values())
    ties = {key: rng.random() for key in keys}
    for key in sorted(keys, key=lambda key: (sizes[key] - shares[key], ties[key]))[:remainder]:
        sizes[key] += 1
    eval_positions: set[int] = set()
    for key in keys:
        eval_positions.update(rng.sample(groups[key], sizes[key]))
    train, evaluation = _partition_positions(examples, eval_positions)
    if not train or not evaluation:
        raise TunelineError(
            f"dataset: {len(examples)} example(s) left after cleaning, too few to split with "
            f"eval_fraction {eval_fraction}; add data or change dataset.eval_fraction"
        )
    return train, evaluation


def apply_weights(train: list[Encoded], sources: list[Source], seed: int) -> list[Encoded]:
    """Scale each source's share of the train split by its weight: repeat whole copies, then sample."""
    rng = random.Random(seed)
    weighted = []
    for index, source in enumerate(sources):
        members = [encoded for encoded in train if encoded.example.source == index]
        target = round(len(members) * source.weight)
        copies, rest = divmod(target, len(members)) if members else (0, 0)
        weighted += members * copies + [members[i] for i in sorted(rng.sample(range(len(members)), rest))]
    return weighted
