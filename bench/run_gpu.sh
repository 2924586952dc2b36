#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md, at the real Qwen-1.8B shape with random bf16 weights (3.7 GB, built once under
# bench/). Each step's log goes to $OUT_DIR/<step>.log and each benchmark's JSON line to $OUT_DIR/results.jsonl.
#
#   bash bench/run_gpu.sh                      # every step, with .venv/bin/python
#   PYTHON=python3 OUT_DIR=/tmp/b bash bench/run_gpu.sh train_synthetic predict
#
# Steps: train_synthetic (bench_train, 2 x 2,048 tokens), train_real (bench_train on data/train.json),
# train_real_mask (the same with the explicit attention mask: the before of dropping it),
# predict (bench_predict, 50 test dialogues, 128 new tokens, batches 8/16/32; about 6-7 minutes on an H100, most of
# it the one-at-a-time baseline at ~4.2 s per dialogue), predict_fp32 (a short fp32 run whose outputs must equal the
# baseline's: in bf16, near-ties among 151,936 random logits round differently in the two paths, so bf16 outputs
# differ),
# trainpy (train.py itself under the deepspeed launcher on one GPU, 20 optimizer steps of the chapter's command, for
# s/step and peak memory; its figures are its step lines, repeated at the end).
# The engine's decoding (CUDA graphs, continuous batching; issue 19), none of which needs the chapter's baseline:
# graphs_test (the GPU-only test: graph steps equal eager steps), decode (50 dialogues x 150 new tokens at batch 1
# and 50, graphs), decode_gold (answers as long as the gold ones, so rows end at different steps; batch 32 and 50),
# decode_eager (the before: 8 dialogues, eager steps, batch 1 and 8), decode_fp32 (fp32, 8 dialogues: outputs
# equal to the chapter's way), decode_grounded (the grammar's cost at batch 32).
# All steps take about 11 minutes on an H100: where one command may run 10, run them as two commands,
# `train_synthetic train_real train_real_mask trainpy` (4 minutes on 2026-11-22, building the checkpoint included)
# and `predict predict_fp32` (about 7). A failed step is reported and the next one still runs; the exit status is 1
# if any failed. STEP_TIMEOUT=<seconds> bounds each step: give predict 480 or more.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-bench/gpu_out}
TRAIN_OUT=${TRAIN_OUT:-bench/gpu_train_run}  # train.py's checkpoints (about 0.28 GB each)
MODEL=bench/tiny_qwen_h2048_l24_a16_i11008_s1234_bfloat16  # what bench_train --real_shape builds (seed 1234)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(train_synthetic train_real train_real_mask predict predict_fp32 trainpy)
KNOWN="train_synthetic train_real train_real_mask predict predict_fp32 trainpy graphs_test decode decode_gold \
decode_eager decode_fp32 decode_grounded"
for step in "${STEPS[@]}"; do
    case " $KNOWN " in
    *" $step "*) ;;
    *) echo "bench/run_gpu.sh: unknown step '$step' ($KNOWN)" >&2; exit 2 ;;
    esac
done
"$PYTHON" - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/run_gpu.sh: no CUDA GPU")
import bitsandbytes, deepspeed, peft, transformers  # fail here, not in the middle of the steps
print(f"==> Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, deepspeed {deepspeed.__version__}, "
      f"{torch.cuda.get_device_name()}", flush=True)
EOF
mkdir -p "$OUT_DIR"
[ -f data/train.json ] && [ -f data/test.json ] || "$PYTHON" data_helper.py || exit 1

failed=()
run() {  # run STEP COMMAND...: log to $OUT_DIR/STEP.log, keep the JSON result line
    local step=$1; shift
    echo "==> $step: $*"
    local start=$SECONDS
    local limit=()
    [ -z "${STEP_TIMEOUT:-}" ] || limit=(timeout "$STEP_TIMEOUT")
    if ! PYTHONUNBUFFERED=1 "${limit[@]}" "$@" 2>&1 | tee "$OUT_DIR/$step.log"; then
        echo "==> $step FAILED (see $OUT_DIR/$step.log)"
        failed+=("$step")
    fi
    grep -h '^{"benchmark"' "$OUT_DIR/$step.log" >>"$OUT_DIR/results.jsonl" || true
    echo "==> $step: $((SECONDS - start)) s"
}

model() {  # the random 1.8B-shape checkpoint, built (about 30 s) without running a benchmark
    [ -f "$MODEL/config.json" ] || "$PYTHON" -c "from bench.bench_train import parse_args; from bench.common import \
random_model; random_model(parse_args(['--real_shape']))"
}

for step in "${STEPS[@]}"; do
    case $step in
    train_synthetic) run "$step" "$PYTHON" -m bench.bench_train --real_shape --device cuda ;;
    train_real) run "$step" "$PYTHON" -m bench.bench_train --real_shape --device cuda --train_path data/train.json ;;
    train_real_mask)
        run "$step" "$PYTHON" -m bench.bench_train --real_shape --device cuda --train_path data/train.json \
            --attention_mask ;;
    predict)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --new_tokens 128 \
            --batch_sizes 8 16 32 ;;
    predict_fp32)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --dtype fp32 \
            --num_samples 8 --new_tokens 32 --batch_sizes 8 ;;
    graphs_test) run "$step" "$PYTHON" -m pytest tests/test_generation.py -q -k cuda ;;
    decode)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --new_tokens 150 \
            --batch_sizes 1 50 --round_size 50 --no_chapter --engine graphs ;;
    decode_gold)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --stop_at_gold_length \
            --batch_sizes 32 50 --round_size 50 --no_chapter --engine graphs ;;
    decode_eager)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --new_tokens 150 \
            --num_samples 8 --batch_sizes 1 8 --round_size 8 --no_chapter --engine eager ;;
    decode_fp32)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --dtype fp32 \
            --num_samples 8 --new_tokens 32 --batch_sizes 8 --engine graphs ;;
    decode_grounded)
        model
        run "$step" "$PYTHON" -m bench.bench_predict --model_path "$MODEL" --device cuda --new_tokens 150 \
            --batch_sizes 32 --round_size 50 --constraint grounded --engine graphs ;;
    trainpy)
        model
        run "$step" "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 train.py --train_path data/train.json \
            --test_path data/test.json --model_name_or_path "$MODEL" --per_device_train_batch_size 2 \
            --max_len 2048 --max_src_len 1560 --learning_rate 1e-4 --weight_decay 0.1 --num_train_epochs 3 \
            --gradient_accumulation_steps 4 --warmup_ratio 0.03 --seed 1234 --show_loss_step 5 --lora_dim 16 \
            --lora_alpha 64 --save_model_step 10 --lora_dropout 0.1 --gradient_checkpointing \
            --ds_file ds_zero2_no_offload.json --is_skip --stop_after_steps 20 \
            --output_dir "$TRAIN_OUT" --overwrite_output_dir
        # peak GB there is max_memory_allocated since the start, load included (the chapter's MaxMemAllocated)
        grep -a "s/step\|ppl" "$OUT_DIR/$step.log" | tail -n 8 ;;
    esac
done
echo "==> results: $OUT_DIR/results.jsonl"
cat "$OUT_DIR/results.jsonl" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> failed: ${failed[*]}"
    exit 1
fi
