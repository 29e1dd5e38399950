"""Derive transformers' CLIP tokenizer files from open-clip's BPE vocabulary, once.

The committed files ``src/dori/models/assets/clip_tokenizer/{vocab.json,merges.txt}`` were made by
this script from ``bpe_simple_vocab_16e6.txt.gz`` (shipped in the ``open-clip-torch`` wheel, data
from OpenAI CLIP, MIT licence). It rebuilds the vocabulary the way CLIP's ``SimpleTokenizer`` does,
so the ids are CLIP's own. Usage::

    pip download --no-deps open-clip-torch -d /tmp/oc && unzip /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python tools/build_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out_dir}")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
