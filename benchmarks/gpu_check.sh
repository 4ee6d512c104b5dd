#!/usr/bin/env bash
# benchmarks/gpu_check.sh: throughput of nasiam-hf on ONE GPU, offline, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh               # GPU: ResNet-18/CIFAR 32x32 (batch 512), ResNet-50/224 (batch 128)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # any machine: the same two runs at tiny sizes on the CPU
#   bash benchmarks/gpu_check.sh --backbones   # GPU: timm ResNet-50 and ViT-S/16 at 224, ViT-Ti/4 at 32, and a
#                                              # transformers ConvNeXt-T at 224 (steps and kNN; bf16+channels_last)
#   bash benchmarks/gpu_check.sh --backbones --cpu-smoke   # the same four at tiny batches on the CPU (32 and 224 px)
#
# Options: --wheels DIR (wheel folder, default benchmarks/.whl), --out DIR (JSON files; default $OUT, else a
# temporary folder), --compile (also time a torch.compile'd backbone; adds 1-2 minutes per run).
#
# What it needs. The GPU image has python 3.12, torch 2.11, transformers 5.17 and huggingface_hub 1.33, and no
# datasets or kornia. nasiam-hf runs from this checkout through PYTHONPATH (no install). The benchmark builds
# synthetic images, so `datasets` and its dependencies (pyarrow, dill, xxhash, multiprocess, fsspec, ...) are NOT
# needed, and nothing uses kornia. What may be missing is accelerate with the two compiled/extra dependencies it
# pulls (psutil, pyyaml), and torchvision if the image lacks it (it must match torch 2.11: torchvision 0.26.x).
# Fill the wheel folder on a machine with network access:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d benchmarks/.whl accelerate==1.15.0 psutil==7.2.2 pyyaml==6.0.3
#   # only if the image has no torchvision (the PyTorch index wheel for the image's CUDA build):
#   #   ... -d benchmarks/.whl torchvision==0.26.0
#
# and carry the folder with the checkout. Only modules that fail to import are installed, with
# `pip install --no-index --no-deps --find-links benchmarks/.whl`. --backbones also needs timm (a pure-Python wheel;
# its dependencies torch, torchvision, pyyaml, huggingface_hub and safetensors are the ones above):
#
#   python3 -m pip download --no-deps --only-binary=:all: -d benchmarks/.whl timm==1.0.31
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

mode="gpu"
wheels="$here/.whl"
out="${OUT:-}"
compile_flag=()
backbones=0
while (($# > 0)); do
    case "$1" in
        --cpu-smoke) mode="cpu" ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        --compile) compile_flag=(--compile) ;;
        --backbones) backbones=1 ;;
        -h | --help) sed -n '2,33p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$out" ]]; then
    out="$(mktemp -d)"
fi
mkdir -p "$out"

PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
start_time=$SECONDS

say() { printf '[gpu_check %3ds] %s\n' "$((SECONDS - start_time))" "$*" >&2; }

# ---- 1. dependencies -------------------------------------------------------------------------------------------------
missing_modules() {
    # prints the distribution names of the modules that do not import
    NEEDS_TIMM="$backbones" "$PYTHON" - <<'PY'
import importlib, os
needed = {"torch": "torch", "torchvision": "torchvision", "transformers": "transformers",
          "huggingface_hub": "huggingface_hub", "accelerate": "accelerate", "safetensors": "safetensors",
          "PIL": "pillow", "numpy": "numpy", "tqdm": "tqdm", "yaml": "pyyaml", "psutil": "psutil",
          "packaging": "packaging"}
if os.environ.get("NEEDS_TIMM") == "1":
    needed["timm"] = "timm"
missing = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(dist)
print(" ".join(missing))
PY
}

read -r -a missing <<<"$(missing_modules)"
if ((${#missing[@]} > 0)); then
    say "missing: ${missing[*]}"
    if compgen -G "$wheels/*.whl" >/dev/null; then
        say "installing them from $wheels (offline, no dependency resolution)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$wheels" "${missing[@]}" || true
        read -r -a missing <<<"$(missing_modules)"
    fi
fi
if ((${#missing[@]} > 0)); then
    echo "gpu_check: still missing: ${missing[*]}. Fill $wheels on a machine with network access:" >&2
    echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\" >&2
    echo "      --platform manylinux_2_28_x86_64 -d $wheels ${missing[*]}" >&2
    exit 3
fi
"$PYTHON" -c "import nasiam_hf, nasiam_hf.data.augment" || { echo "gpu_check: nasiam_hf does not import" >&2; exit 3; }

# ---- 2. the machine --------------------------------------------------------------------------------------------------
"$PYTHON" - <<'PY' >&2
import os, torch, torchvision, transformers, accelerate
print(f"python torch {torch.__version__} (cuda {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
if [[ "$mode" == "gpu" ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible; run with --cpu-smoke to check the script on the CPU" >&2
        exit 4
    fi
fi

# ---- 3. the two benchmark runs ---------------------------------------------------------------------------------------
bench() {  # bench NAME SECONDS ARGS...: run throughput.py under a time limit, JSON to stdout and $out/NAME.json
    local name="$1" limit="$2"
    shift 2
    say "$name: benchmarks/throughput.py $*"
    if ! timeout "$limit" "$PYTHON" benchmarks/throughput.py "$@" ${compile_flag[@]+"${compile_flag[@]}"} \
        --output "$out/$name.json"; then
        echo "gpu_check: $name failed or ran past ${limit}s" >&2
        return 1
    fi
}

status=0
if ((backbones)); then
    # A ConvNeXt-T config (transformers' defaults) in a folder: the transformers backbone, offline.
    "$PYTHON" -c "import sys; from transformers import ConvNextConfig; ConvNextConfig().save_pretrained(sys.argv[1])" \
        "$out/convnext-tiny-config"
    common=(--skip data,optimizer --variants bf16+channels_last)
    vit32=(--backbone timm/vit_tiny_patch16_224 --backbone_kwargs '{"img_size": 32, "patch_size": 4}')
    if [[ "$mode" == "gpu" ]]; then
        sizes=(--device cuda --repeats 3 --warmup 2 --knn_images 2048 --eval_batch_size 256)
        bench timm_resnet50_224_b128 70 --backbone timm/resnet50 --image_size 224 --batch_size 128 "${sizes[@]}" \
            "${common[@]}" || status=1
        bench timm_vit_small_224_b128 70 --backbone timm/vit_small_patch16_224 --image_size 224 --batch_size 128 \
            "${sizes[@]}" "${common[@]}" || status=1
        bench timm_vit_tiny_p4_32_b512 70 "${vit32[@]}" --image_size 32 --batch_size 512 "${sizes[@]}" \
            "${common[@]}" || status=1
        bench hf_convnext_tiny_224_b128 70 --backbone "$out/convnext-tiny-config" --image_size 224 --batch_size 128 \
            "${sizes[@]}" "${common[@]}" || status=1
    else
        sizes=(--device cpu --repeats 1 --warmup 1 --knn_images 8 --eval_batch_size 4 --batch_size 2)
        bench timm_resnet50_224_b128 300 --backbone timm/resnet50 --image_size 224 "${sizes[@]}" "${common[@]}" \
            || status=1
        bench timm_vit_small_224_b128 300 --backbone timm/vit_small_patch16_224 --image_size 224 "${sizes[@]}" \
            "${common[@]}" || status=1
        bench timm_vit_tiny_p4_32_b512 300 "${vit32[@]}" --image_size 32 "${sizes[@]}" "${common[@]}" || status=1
        bench hf_convnext_tiny_224_b128 300 --backbone "$out/convnext-tiny-config" --image_size 224 "${sizes[@]}" \
            "${common[@]}" || status=1
    fi
elif [[ "$mode" == "gpu" ]]; then
    bench resnet18_cifar32_b512 140 --device cuda --backbone resnet18 --image_size 32 --batch_size 512 \
        --repeats 5 --warmup 2 --data_batches 24 --knn_images 8192 --eval_batch_size 1024 --extrapolate || status=1
    bench resnet50_224_b128 140 --device cuda --backbone resnet50 --image_size 224 --batch_size 128 \
        --repeats 5 --warmup 2 --data_batches 16 --knn_images 2048 --eval_batch_size 256 || status=1
else
    bench resnet18_cifar32_b512 400 --device cpu --backbone resnet18 --image_size 32 --batch_size 8 \
        --repeats 1 --warmup 1 --data_batches 2 --knn_images 64 --eval_batch_size 32 --extrapolate \
        --variants fp32,bf16+channels_last || status=1
    bench resnet50_224_b128 400 --device cpu --backbone resnet50 --image_size 96 --batch_size 4 \
        --repeats 1 --warmup 1 --data_batches 2 --knn_images 16 --eval_batch_size 8 \
        --variants fp32,bf16+channels_last || status=1
fi

# ---- 4. summary ------------------------------------------------------------------------------------------------------
"$PYTHON" - "$out" <<'PY'
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
for path in sorted(folder.glob("*.json")):
    r = json.loads(path.read_text())
    c = r["config"]
    print(f"\n== {path.stem}: {c['backbone']} {c['image_size']}px batch {c['batch_size']} on {c['device_name']}")
    data = r.get("data", {})
    if data:
        print(f"   data images/s: per-image loader {data['per_image_loader']['images_per_second']} "
              f"({data['num_workers']} workers), batched on device {data['batched_on_device']['images_per_second']}")
    for variant, s in r.get("steps", {}).items():
        rates = {k: s[k]["images_per_second"] for k in ("alpha_step", "search_weight_step", "pretrain_step") if k in s}
        print(f"   {variant:>20}: images/s {rates}  ratios {s.get('ratios')}")
    for variant, e in r.get("extrapolation", {}).items():
        print(f"   {variant:>20}: 100-epoch CIFAR-10 search {e['search_100_epochs_hours']} h, 800-epoch pretraining "
              f"{e['pretrain_800_epochs_hours']} h (compute only)")
        for path in ("per_image_loader", "batched_on_device"):
            if f"with_{path}" in e:
                print(f"   {'':>20}  with the {path} data rate: {e[f'with_{path}']}")
print(f"\nJSON files in {folder}")
PY
say "done"
exit "$status"
