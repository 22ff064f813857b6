"""Checkpoint verification report (no tensor data is loaded, only safetensors headers).

    python -m wicore.model.verify CHECKPOINT_DIR [--sha256]

Checks: required files, every shard named in the index present, every indexed tensor stored in its
shard (and nothing stored outside the index), headers readable and not truncated, tensor names and
shapes, tensor and parameter counts against the ModelSpec built from config.json, dtypes, optional
SHA-256 per file, tokenizer / generation config noted. Exit status 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wicore.errors import ConfigError
from wicore.model.checkpoint import (
    ALL_DTYPE_BYTES,
    FLOAT_DTYPES,
    TORCH_DTYPE_NAMES,
    CheckpointError,
    TensorEntry,
    canonical_name,
    expected_tensors,
    read_header,
    spec_from_checkpoint,
    weight_files,
)
from wicore.model.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
SAFETENSORS_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | WARN | INFO
    detail: str
    lines: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    path: Path
    checks: list[Check] = field(default_factory=list)
    spec: ModelSpec | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    def add(self, name: str, ok: bool | None, detail: str, lines: list[str] | None = None) -> None:
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.checks.append(Check(name, status, detail, list(lines or [])))

    def warn(self, name: str, detail: str, lines: list[str] | None = None) -> None:
        self.checks.append(Check(name, "WARN", detail, list(lines or [])))

    def render(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        out = [f"Checkpoint verification: {self.path}", f"{'STATUS':6}  {'CHECK':{width}}  DETAIL",
               f"{'-' * 6}  {'-' * width}  {'-' * 40}"]
        for c in self.checks:
            out.append(f"{c.status:6}  {c.name:{width}}  {c.detail}")
            shown = c.lines[:20]
            out += [f"{'':6}  {'':{width}}    - {line}" for line in shown]
            if len(c.lines) > len(shown):
                out.append(f"{'':6}  {'':{width}}    ... and {len(c.lines) - len(shown)} more")
        counts = {s: sum(c.status == s for c in self.checks) for s in ("PASS", "FAIL", "WARN", "INFO")}
        verdict = "OK" if self.ok else "FAILED"
        out.append(f"Summary: {verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str | Path, sha256: bool = False) -> VerifyReport:
    root = Path(path)
    report = VerifyReport(root)
    if not root.is_dir():
        report.add("directory", False, f"{root} is not a directory")
        return report
    spec: ModelSpec | None = None
    try:
        spec = spec_from_checkpoint(root)
        report.spec = spec
        report.add("config.json", True, f"{spec.family}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
                   f"{spec.num_heads}/{spec.num_kv_heads} heads, vocab {spec.vocab_size}")
    except ConfigError as exc:
        report.add("config.json", False, str(exc))
    try:
        weight_map, files = weight_files(root)
    except CheckpointError as exc:
        report.add("weights", False, str(exc))
        return report
    present = [f for f in files if f.is_file()]
    missing_files = [f.name for f in files if not f.is_file()]
    kind = f"{len(files)} shard(s) + index" if weight_map is not None else f"{len(files)} file(s), no index"
    report.add("weight files", not missing_files, f"{kind}, {len(present)} present",
               [f"{n}: missing (named in model.safetensors.index.json)" for n in missing_files])

    headers: dict[Path, dict[str, TensorEntry]] = {}
    bad: list[str] = []
    for f in present:
        try:
            headers[f] = read_header(f)
        except CheckpointError as exc:
            bad.append(str(exc))
    report.add("headers", not bad, f"{len(headers)}/{len(present)} safetensors headers readable", bad)

    if weight_map is not None:
        problems = []
        for name, fname in weight_map.items():
            h = headers.get(root / fname)
            if h is not None and name not in h:
                problems.append(f"{name}: listed under {fname} but not stored in it")
        for f, h in headers.items():
            problems += [f"{n}: stored in {f.name} but not listed in the index" for n in h if n not in weight_map]
        report.add("index consistency", not problems, f"{len(weight_map)} tensors indexed", problems)
        total = json.loads((root / "model.safetensors.index.json").read_text()).get("metadata", {}).get(
            "total_size")
        stored = sum(e.numel * ALL_DTYPE_BYTES.get(e.dtype, 0) for h in headers.values() for e in h.values())
        if total is not None and int(total) != stored and not missing_files:
            report.warn("index total_size", f"metadata says {int(total)} B, headers hold {stored} B")

    found: dict[str, TensorEntry] = {}
    skipped = 0
    for h in headers.values():
        for e in h.values():
            canon = canonical_name(e.name)
            if canon is None:
                skipped += 1
            else:
                found[canon] = e
    lost = {canonical_name(n) or n: f for n, f in (weight_map or {}).items() if f in missing_files}
    if spec is not None:
        _check_tensors(report, spec, found, skipped, lost)
    dtypes = sorted({e.dtype for e in found.values()})
    non_float = [f"{n}: {e.dtype}" for n, e in found.items() if e.dtype not in FLOAT_DTYPES]
    report.add("dtypes", not non_float, ", ".join(dtypes) or "no tensors", non_float)
    if spec is not None and dtypes and not non_float:
        want = spec.dtype
        if len(dtypes) > 1 or SAFETENSORS_NAMES.get(dtypes[0]) != want:
            report.warn("dtype vs config", f"config torch_dtype is {TORCH_DTYPE_NAMES.get(want, want)}, "
                        f"weights are {', '.join(dtypes)}")
    if sha256:
        report.add("sha256", None, f"{len(present)} file(s)", [f"{f.name}: {_sha256(f)}" for f in present])
    tok = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    report.add("tokenizer", None, ", ".join(tok) if tok else "no tokenizer files (supply one separately)")
    report.add("generation_config.json", None,
               "present" if (root / "generation_config.json").is_file() else "absent (defaults apply)")
    return report


def _check_tensors(report: VerifyReport, spec: ModelSpec, found: dict[str, TensorEntry], skipped: int,
                   lost: dict[str, str]) -> None:
    expected = expected_tensors(spec)
    lines = []
    for name, shape in expected.items():
        e = found.get(name)
        if e is None:
            why = f"; its shard {lost[name]} is missing" if name in lost else ""
            lines.append(f"{name}: missing (expected shape {shape}{why})")
        elif e.shape != shape:
            lines.append(f"{name}: expected shape {shape}, found {e.shape}")
    extra = [n for n in found if n not in expected and not (n == "lm_head.weight" and spec.tie_embeddings)]
    lines += [f"{n}: unexpected tensor (shape {found[n].shape})" for n in extra]
    note = f" ({skipped} vision tensors skipped)" if skipped else ""
    report.add("tensor names/shapes", not lines, f"{len(expected)} expected{note}", lines)
    counted = {n: e for n, e in found.items() if n in expected}
    report.add("tensor count", len(counted) == len(expected) and not extra,
               f"expected {len(expected)}, found {len(counted)} (+{len(extra)} unexpected)")
    params = sum(e.numel for e in counted.values())
    report.add("parameter count", params == spec.total_params,
               f"expected {spec.total_params:,} ({_human(spec.total_params)}), found {params:,}")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wicore.model.verify",
                                     description="verify a Hugging Face-layout safetensors checkpoint")
    parser.add_argument("path")
    parser.add_argument("--sha256", action="store_true", help="hash every file (slow for big models)")
    args = parser.parse_args(argv)
    report = verify_checkpoint(args.path, sha256=args.sha256)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
