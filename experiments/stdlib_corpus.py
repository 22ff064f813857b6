"""The training corpus of the project's small model: the Python standard library's own source.

Every Python installation ships it, so the corpus needs no download and is reproducible from the
Python version alone (``sysconfig.get_paths()["stdlib"]``; record ``sys.version``: another version
ships somewhat different files).

* Files: every ``*.py`` under the stdlib directory, except test directories (a path component
  ``test``/``tests`` or ending in ``_test``/``_tests``, e.g. ``test/``, ``idlelib/idle_test/``,
  ``lib2to3/tests/``), ``site-packages``/``dist-packages`` and ``__pycache__``. Read as UTF-8
  (undecodable bytes replaced).
* Split: by a hash of the path relative to the stdlib directory (posix form): file ``f`` is held
  out when ``int(sha256(f)[:8], 16) % 10_000 < heldout_bp`` (default 200 basis points = 2%), so
  the split does not depend on the machine, the file order or the other files.
* Tokens: each file is ``<bos> ids <eos>``; files are concatenated in path order into one stream
  per split. Training samples windows at random offsets of the train stream; evaluation uses
  consecutive non-overlapping windows of the held-out stream (a window may start mid-file).
* Tokenizer: byte-level BPE trained with ``tokenizers`` on the train files only; specials
  ``<pad>``=0, ``<eos>``=1, ``<bos>``=2 (the ids of ``wicore.model.checkpoint.hf_config``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wicore.errors import ConfigError

SPECIALS = ("<pad>", "<eos>", "<bos>")  # ids 0, 1, 2
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
SKIP_DIRS = frozenset({"test", "tests", "site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, heldout_bp: int = 200) -> bool:
    """Held-out membership of a stdlib-relative posix path (``heldout_bp`` basis points held out)."""
    return int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) % 10_000 < heldout_bp


@dataclass(frozen=True)
class CorpusFiles:
    root: Path
    train: tuple[str, ...]  # stdlib-relative posix paths, sorted
    heldout: tuple[str, ...]

    def texts(self, which: str) -> list[str]:
        names = self.train if which == "train" else self.heldout
        return [(self.root / n).read_bytes().decode("utf-8", errors="replace") for n in names]

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "train_files": len(self.train), "heldout_files": len(self.heldout),
                "heldout": list(self.heldout)}


def list_files(root: Path | None = None, heldout_bp: int = 200, max_files: int | None = None) -> CorpusFiles:
    """The split. ``max_files`` (small runs, tests) keeps the ``max_files`` train files and
    ``max(1, max_files // 8)`` held-out files with the smallest hashes (deterministic)."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise ConfigError(f"corpus: stdlib directory {root} does not exist")
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(("_test", "_tests"))]
        rel_dir = Path(dirpath).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    rels.sort()
    train = [r for r in rels if not is_heldout(r, heldout_bp)]
    heldout = [r for r in rels if is_heldout(r, heldout_bp)]
    if max_files is not None:
        def by_hash(names: list[str]) -> list[str]:
            return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())

        train = sorted(by_hash(train)[:max_files])
        heldout = sorted(by_hash(heldout)[:max(1, max_files // 8)])
    if not train or not heldout:
        raise ConfigError(f"corpus: {len(train)} train / {len(heldout)} held-out files under {root}; "
                          "raise --max-files or --heldout-bp")
    return CorpusFiles(root, tuple(train), tuple(heldout))


def heldout_from_log(checkpoint: Path) -> CorpusFiles | None:
    """The held-out files recorded in a checkpoint's ``training_log.json`` (found under this
    machine's stdlib), or None when the log or the files are missing."""
    log = checkpoint / "training_log.json"
    if not log.is_file():
        return None
    names = json.loads(log.read_text()).get("corpus", {}).get("heldout") or []
    root = stdlib_root()
    names = [n for n in names if (root / n).is_file()]
    return CorpusFiles(root, (), tuple(names)) if names else None


# ----- tokenizer ----------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space) with <pad>, <eos>, <bos> at 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIALS) + 256:
        raise ConfigError(f"tokenizer: vocab_size {vocab_size} < {len(SPECIALS) + 256} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIALS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"tokenizer: special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def save_tokenizer(tok: Any, out_dir: Path, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (what ``wicore.server.tokenizer`` and HF read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
           "pad_token": "<pad>", "model_max_length": model_max_length, "add_bos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer_file(path: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode_stream(tok: Any, texts: list[str]) -> Tensor:
    """``<bos> ids <eos>`` per text, concatenated: int64 [N] on the CPU."""
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(BOS_ID)
        out.extend(enc.ids)
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.int64)


def random_windows(stream: Tensor, batch: int, length: int, gen: torch.Generator) -> Tensor:
    """``batch`` windows of ``length`` tokens at uniform random offsets: [batch, length]. ``gen`` lives
    on the stream's device, so sampling on a GPU needs no host synchronisation."""
    if stream.numel() < length + 1:
        raise ConfigError(f"corpus: {stream.numel()} tokens, fewer than one window of {length}; "
                          "use more files or a shorter context")
    starts = torch.randint(0, stream.numel() - length + 1, (batch,), generator=gen, device=gen.device)
    return stream[starts[:, None] + torch.arange(length, device=gen.device)[None, :]]


def consecutive_windows(stream: Tensor, length: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of ``length`` tokens from the start: [n, length]."""
    n = stream.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"corpus: {stream.numel()} held-out tokens, fewer than one window of {length}")
    return stream[: n * length].view(n, length)
