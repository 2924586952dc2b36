#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md, at the real Qwen-1.8B shape with random bf16 weights (3.7 GB, built once under
# bench/). Each step's log goes to $OUT_DIR/<step>.log and each benchmark's JSON line to $OUT_DIR/results.jsonl.
#
#   bash bench/run_gpu.sh                      # every step, with .venv/bin/python
#   PYTHON=python3 OUT_DIR=/tmp/b bash bench/run_gpu.sh train_synthetic predict
#
# Steps: train_synthetic (bench_train, 2 x 2,048 tokens), train_real (bench_train on data/train.json),
# train_real_mask (the same with the explicit attention mask: the before of dropping it),
# predict (bench_predict, 50 test dialogues, 128 new tokens, batches 8/16/32), trainpy (train.py itself under the
# deepspeed launcher on one GPU, 20 optimizer steps of the chapter's command, for s/step and peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-bench/gpu_out}
TRAIN_OUT=${TRAIN_OUT:-bench/gpu_train_run}  # train.py's checkpoints (about 0.25 GB each)
MODEL=bench/tiny_qwen_h2048_l24_a16_i11008_s1234_bfloat16  # what bench_train --real_shape builds (seed 1234)
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(train_synthetic train_real train_real_mask predict trainpy)
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/run_gpu.sh: no CUDA GPU')"
mkdir -p "$OUT_DIR"
[ -f data/train.json ] && [ -f data/test.json ] || "$PYTHON" data_helper.py

run() {  # run STEP COMMAND...: log to $OUT_DIR/STEP.log, keep the JSON result line
    local step=$1; shift
    echo "==> $step: $*"
    local start=$SECONDS
    PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$OUT_DIR/$step.log"
    grep -h '^{"benchmark"' "$OUT_DIR/$step.log" >>"$OUT_DIR/results.jsonl" || true
    echo "==> $step: $((SECONDS - start)) s"
}

for step in "${STEPS[@]}"; do
    case $step in
    train_synthetic) run "$step" "$PYTHON" bench/bench_train.py --real_shape --device cuda ;;
    train_real) run "$step" "$PYTHON" bench/bench_train.py --real_shape --device cuda --train_path data/train.json ;;
    train_real_mask)
        run "$step" "$PYTHON" bench/bench_train.py --real_shape --device cuda --train_path data/train.json \
            --attention_mask ;;
    predict)
        [ -f "$MODEL/config.json" ] || "$PYTHON" bench/bench_train.py --real_shape --device cuda --steps 1
        run "$step" "$PYTHON" bench/bench_predict.py --model_path "$MODEL" --device cuda --new_tokens 128 \
            --batch_sizes 8 16 32 ;;
    trainpy)
        [ -f "$MODEL/config.json" ] || "$PYTHON" bench/bench_train.py --real_shape --device cuda --steps 1
        run "$step" "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 train.py --train_path data/train.json \
            --test_path data/test.json --model_name_or_path "$MODEL" --per_device_train_batch_size 2 \
            --max_len 2048 --max_src_len 1560 --learning_rate 1e-4 --weight_decay 0.1 --num_train_epochs 3 \
            --gradient_accumulation_steps 4 --warmup_ratio 0.03 --seed 1234 --show_loss_step 5 --lora_dim 16 \
            --lora_alpha 64 --save_model_step 10 --lora_dropout 0.1 --gradient_checkpointing \
            --ds_file ds_zero2_no_offload.json --is_skip --stop_after_steps 20 \
            --output_dir "$TRAIN_OUT" --overwrite_output_dir ;;
    *) echo "bench/run_gpu.sh: unknown step '$step' (train_synthetic, train_real, train_real_mask, predict," \
        "trainpy)" >&2; exit 2 ;;
    esac
done
echo "==> results: $OUT_DIR/results.jsonl"
