"""Any text file -> a flat uint16 token file, one token per byte (vocabulary 256), nanoGPT's train.bin format.

    python examples/gpt/make_tokens.py README.md /tmp/readme.bin

then train on it: the command in examples/gpt/__init__.py (and examples/README.md).

A real tokenizer (e.g. tiktoken's GPT-2 encoding, vocabulary 50257) writes the same format: ids as
uint16, back to back; then set ``model.vocab`` to its vocabulary size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def encode(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).astype(np.uint16)


def decode(tokens: np.ndarray) -> str:
    return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", type=Path, help="any file; its bytes are the tokens")
    p.add_argument("out", type=Path, help="the uint16 token file to write")
    args = p.parse_args(argv)
    tokens = encode(args.text.read_bytes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokens.tofile(args.out)
    print(f"wrote {len(tokens)} tokens (vocabulary 256) to {args.out}")


if __name__ == "__main__":
    main()
