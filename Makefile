# make demo : the whole chapter on this CPU with a tiny random-weight Qwen (about 5 minutes on 2 cores)
# make test : the test suite
# Both create .venv (pinned requirements) on first use; every step is skipped when its output already exists.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO := demo_out
TINY := $(DEMO)/tiny_qwen
RUN := $(DEMO)/output_dir_qlora
MERGED := $(DEMO)/merged
PRED := $(DEMO)/predictions.jsonl
# the chapter's settings, scaled down: 64 training dialogues, 2 epochs, two CPU ranks over gloo
DEMO_TRAIN_SAMPLES := 64
DEMO_NEW_TOKENS := 96
DEMO_LR := 2e-3

.PHONY: help venv test demo bench bench-gpu clean clean-demo distclean

help:
	@echo "make demo       run the chapter end to end on the CPU with a tiny random model ($(DEMO)/)"
	@echo "make test       run the test suite"
	@echo "make bench      run the CPU benchmarks (bench/)"
	@echo "make bench-gpu  run the GPU benchmarks at the real 1.8B shape (bench/run_gpu.sh)"
	@echo "make clean      remove caches; clean-demo removes $(DEMO)/; distclean also removes .venv"

venv: $(STAMP)

$(STAMP): requirements.txt
	@echo "==> creating $(VENV) and installing the pinned requirements (first time only, a few minutes)"
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-build-isolation -r requirements.txt
	@touch $(STAMP)

test: $(STAMP)
	@echo "==> running the test suite"
	$(VPY) -m pytest tests

# ---- demo ---------------------------------------------------------------------------------------------------------

demo: $(STAMP) $(DEMO)/report.json
	@echo
	@echo "==> the evaluation (a RANDOM tiny model: its F1 is 0; the pipeline, not extraction quality, is shown)"
	@$(VPY) evaluate.py --gold data/test.json --pred $(PRED)
	@echo
	@echo "==> done. A random tiny model demonstrates the pipeline, not extraction quality."
	@echo "    data split:      data/train.json, data/test.json"
	@echo "    checkpoints:     $(RUN)/epoch-*  (best: $$($(VPY) -c "import json;print(json.load(open('$(RUN)/best_checkpoint.json'))['path'])"))"
	@echo "    training plots:  $(RUN)/train_loss.png, $(RUN)/test_ppl.png, $(RUN)/test_f1.png   (TensorBoard: tensorboard --logdir $(RUN))"
	@echo "    merged model:    $(MERGED)"
	@echo "    predictions:     $(PRED)"
	@echo "    evaluation:      $(DEMO)/report.json"
	@echo "    report page:     $(DEMO)/report.html  (open it in a browser: each dialogue, its items hit / extra / missed)"

$(TINY)/config.json: | $(STAMP)
	@echo "==> make demo: a tiny RANDOM-WEIGHT Qwen shows every step of the pipeline on the CPU;"
	@echo "    its extractions are noise. For real results see 'The real run' in README.md."
	@echo "==> building the tiny checkpoint $(TINY) (full 151,936-token vocabulary, 2 layers, width 64)"
	rm -rf $(TINY)
	$(VPY) -m qwen1_8.make_tiny --output_dir $(TINY) --hidden_size 64 --num_hidden_layers 2 \
		--num_attention_heads 4 --intermediate_size 256 --seed 0

data/train.json data/test.json &: data/all.json | $(STAMP)
	@echo "==> splitting data/all.json into data/train.json and data/test.json"
	$(VPY) data_helper.py --all_path data/all.json --train_path data/train.json --test_path data/test.json \
		--test_size 50 --seed 1234

$(DEMO)/train_small.json: data/train.json
	@echo "==> taking the first $(DEMO_TRAIN_SAMPLES) training dialogues for a CPU-sized run"
	head -n $(DEMO_TRAIN_SAMPLES) data/train.json > $@.tmp && mv $@.tmp $@

$(RUN)/best_checkpoint.json: $(TINY)/config.json $(DEMO)/train_small.json data/test.json
	@echo "==> QLoRA training (4-bit NF4, LoRA r=16, DeepSpeed ZeRO-2) on 2 CPU ranks over gloo"
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 --master_port 29517 train.py \
		--train_path $(DEMO)/train_small.json --test_path data/test.json --model_name_or_path $(TINY) \
		--per_device_train_batch_size 2 --max_len 2048 --max_src_len 1560 --learning_rate $(DEMO_LR) \
		--weight_decay 0.1 --num_train_epochs 2 --gradient_accumulation_steps 2 --warmup_ratio 0.1 --seed 1234 \
		--show_loss_step 2 --lora_dim 16 --lora_alpha 64 --save_model_step 4 --lora_dropout 0.1 \
		--output_dir $(RUN) --overwrite_output_dir --gradient_checkpointing --ds_file ds_zero2_no_offload.json \
		--is_skip --eval_max_new_tokens $(DEMO_NEW_TOKENS) --eval_samples 16

$(MERGED)/config.json: $(RUN)/best_checkpoint.json
	@echo "==> merging the best checkpoint's adapter into the unquantized base"
	$(VPY) merge_params.py --ori_model_dir $(TINY) --model_dir $(RUN) --save_model_dir $(MERGED) --overwrite

$(PRED): $(MERGED)/config.json
	@echo "==> batch extraction over the 50 test dialogues (at most $(DEMO_NEW_TOKENS) new tokens each: random weights never"
	@echo "    stop, so --constraint grounded closes each answer at the budget, still valid and grounded)"
	$(VPY) predict.py --model_path $(MERGED) --input_file data/test.json --output_file $(PRED).part \
		--batch_size 16 --max_tgt_len $(DEMO_NEW_TOKENS)
	mv $(PRED).part.settings.json $(PRED).settings.json
	mv $(PRED).part $(PRED)

$(DEMO)/report.json: $(PRED)
	@echo "==> evaluation (precision / recall / F1 per field)"
	$(VPY) evaluate.py --gold data/test.json --pred $(PRED) --report $@ --html $(DEMO)/report.html --json > /dev/null

bench: $(STAMP) data/train.json data/test.json
	@echo "==> extraction throughput: the chapter's one-at-a-time way against batched generation"
	$(VPY) -m bench.bench_predict
	@echo "==> QLoRA training step time and memory"
	$(VPY) -m bench.bench_train

bench-gpu: $(STAMP) data/train.json data/test.json
	PYTHON=$(VPY) bash bench/run_gpu.sh

clean:
	@echo "==> removing caches"
	rm -rf .pytest_cache __pycache__ */__pycache__

clean-demo:  # the data split stays: it is the same from data/all.json and the seed, and a real run may use it
	@echo "==> removing $(DEMO)/"
	rm -rf $(DEMO)

distclean: clean clean-demo
	@echo "==> removing $(VENV)"
	rm -rf $(VENV)
