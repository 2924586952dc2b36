"""qwen1_8 model: checkpoint names and shapes, math against a float64 reference written from the published math,
KV cache, left-padded batches, stopping, gradient checkpointing, 4-bit NF4 + LoRA on CPU, chat()."""
import json
import math
import os

import pytest
import torch

from transformers import GenerationConfig

from qwen1_8 import QWenConfig, QWenLMHeadModel, QWenTokenizer
from qwen1_8.modeling_qwen import ntk_alpha_for
from qwen1_8.qwen_generation_utils import StopWordsLogitsProcessor, decode_tokens, make_context


def tiny_config(**overrides):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8, intermediate_size=64,
                  vocab_size=151936)
    fields.update(overrides)
    return QWenConfig(**fields)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()


# ---- names, shapes, config -----------------------------------------------------------------------------------


def test_published_config_loads_unchanged(reference_dir):
    path = os.path.join(reference_dir, "qwen1_8b_chat")
    config = QWenConfig.from_pretrained(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        published = json.load(f)
    for key, value in published.items():
        if key == "torch_dtype":  # transformers 5 names it `dtype`
            assert str(config.dtype) == f"torch.{value}"
        elif key != "_name_or_path":
            assert getattr(config, key) == value, key


def test_defaults_are_the_1_8b_values():
    c = QWenConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.kv_channels, c.intermediate_size,
            c.seq_length, c.vocab_size) == (2048, 24, 16, 128, 11008, 8192, 151936)


def test_1_8b_names_shapes_and_count():
    with torch.device("meta"):
        model = QWenLMHeadModel(QWenConfig())
    sd = model.state_dict()
    assert len(sd) == 195
    assert sum(t.numel() for t in sd.values()) == 1_836_828_672
    expected = {"transformer.wte.weight": (151936, 2048), "transformer.ln_f.weight": (2048,),
                "lm_head.weight": (151936, 2048)}
    for i in range(24):
        p = f"transformer.h.{i}."
        expected.update({p + "ln_1.weight": (2048,), p + "attn.c_attn.weight": (6144, 2048),
                         p + "attn.c_attn.bias": (6144,), p + "attn.c_proj.weight": (2048, 2048),
                         p + "ln_2.weight": (2048,), p + "mlp.w1.weight": (5504, 2048),
                         p + "mlp.w2.weight": (5504, 2048), p + "mlp.c_proj.weight": (2048, 5504)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_sharded_checkpoint_with_published_config(tmp_path, reference_dir):
    """A directory laid out like the real one (published config.json with tiny sizes, 2 shards) loads."""
    with open(os.path.join(reference_dir, "qwen1_8b_chat", "config.json"), encoding="utf-8") as f:
        published = json.load(f)
    published.update(hidden_size=32, num_attention_heads=4, kv_channels=8, intermediate_size=64,
                     num_hidden_layers=2, torch_dtype="float32")
    torch.manual_seed(0)
    src = QWenLMHeadModel(QWenConfig(**{k: v for k, v in published.items() if k != "torch_dtype"}))
    src.save_pretrained(str(tmp_path), max_shard_size="6MB")
    with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
        json.dump(published, f)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) >= 2
    loaded = QWenLMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    for (name, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.bf16 is True and loaded.config.use_flash_attn is True  # kept, not acted on


def test_init_follows_spec():
    torch.manual_seed(0)
    model = QWenLMHeadModel(tiny_config(hidden_size=256, num_attention_heads=4, kv_channels=64,
                                        intermediate_size=1024, num_hidden_layers=8))
    block = model.transformer.h[0]
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.attn.c_attn.bias == 0)
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005


# ---- math ------------------------------------------------------------------------------------------------------


def reference_logits(sd, cfg, ids, eval_mode=True):
    """A slow, literal float64 transcription of the published math for one unpadded sequence, no cache."""
    sd = {k: v.double() for k, v in sd.items()}
    H, D, T = cfg.num_attention_heads, cfg.kv_channels, len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.layer_norm_epsilon) * w

    alpha = 1.0
    if eval_mode and cfg.use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log2(T / cfg.seq_length) + 1) - 1, 1)
    base = cfg.rotary_emb_base * alpha ** (D / (D - 2))
    inv_freq = torch.tensor([1.0 / base ** (j / D) for j in range(0, D, 2)], dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (T, D)

    def rope(t):  # (T, D)
        half = D // 2
        return t * cos + torch.cat([-t[:, half:], t[:, :half]], -1) * sin

    x = sd["transformer.wte.weight"][torch.tensor(ids)]
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln_1.weight"])
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(H * D, dim=-1)
        heads = []
        for head in range(H):
            sl = slice(head * D, (head + 1) * D)
            qh, kh, vh = rope(q[:, sl]), rope(k[:, sl]), v[:, sl]
            if eval_mode and cfg.use_logn_attn and T > cfg.seq_length:
                scale = torch.tensor([math.log(n, cfg.seq_length) if n > cfg.seq_length else 1.0
                                      for n in range(1, T + 1)], dtype=torch.float64)
                qh = qh * scale[:, None]
            scores = qh @ kh.T / math.sqrt(D)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ vh)
        x = x + torch.cat(heads, -1) @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"])
        up, gate = h @ sd[p + "mlp.w1.weight"].T, h @ sd[p + "mlp.w2.weight"].T
        x = x + (up * (gate * torch.sigmoid(gate))) @ sd[p + "mlp.c_proj.weight"].T
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = QWenLMHeadModel(tiny_config(**overrides))
    with torch.no_grad():  # make norms and biases non-trivial so the test can see mistakes in them
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("c_attn.bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("seq_length, T", [(8192, 20), (8, 30)])  # the second one exercises dynamic NTK and logN
def test_logits_match_reference(seq_length, T):
    model = random_model(seq_length=seq_length).eval()
    ids = torch.randint(0, 151851, (T,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    ref = reference_logits(model.state_dict(), model.config, ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_training_mode_disables_ntk_and_logn():
    model = random_model(seq_length=8).train()
    ids = list(range(100, 130))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    ref = reference_logits(model.state_dict(), model.config, ids, eval_mode=False)
    assert (ours - ref).abs().max().item() < 1e-4


def test_ntk_alpha_values():
    assert [ntk_alpha_for(n, 8192) for n in (1, 8192, 8193, 16384, 16385, 32768, 40000)] == [1, 1, 3, 3, 7, 7, 15]


def test_loss_is_shifted_token_mean(model):
    ids = torch.tensor([[11, 22, 33, 44, 55, 66], [77, 88, 99, 111, 222, 333]])
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :5] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()
    nll = [-torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for b, t in [(0, 3), (0, 4), (0, 5), (1, 5)]]
    assert torch.allclose(out.loss, torch.stack(nll).mean(), atol=1e-5)


def test_padding_mask_keeps_causality(model):
    """The chapter's model lost the causal mask whenever an attention_mask was passed."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(plain, masked, atol=1e-5)


def test_right_padding_does_not_change_real_positions(model):
    ids = [31, 41, 59, 26, 53]
    batch = torch.tensor([ids + [151643] * 3, [27, 18, 28, 18, 28, 45, 90, 45]])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with torch.no_grad():
        alone = model(torch.tensor([ids])).logits[0]
        together = model(batch, attention_mask=mask).logits[0, :5]
    assert torch.allclose(alone, together, atol=1e-5)


def test_right_padded_training_batch_needs_no_mask(tiny_ckpt, tokenizer):
    """train.py drops the collator's attention mask (medextract.training.model_inputs): with right padding and causal
    attention the loss and every gradient are the same as with the mask (to float rounding; bit for bit on this CPU)."""
    from medextract.training import model_inputs
    from utils import DataCollator

    model = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32).train()  # Qwen has no dropout
    long_ids = list(range(1000, 1040))
    items = [{"input_ids": long_ids, "labels": [-100] * 30 + long_ids[30:]},
             {"input_ids": long_ids[:23], "labels": [-100] * 15 + long_ids[15:23]}]
    batch = DataCollator(tokenizer)(items)
    assert batch["attention_mask"][1].tolist().count(0) == 40 - 23  # really padded
    results = []
    for inputs in (dict(batch), model_inputs(batch, torch.device("cpu"))):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, use_cache=False, skip_logits=True).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert "attention_mask" not in model_inputs(batch, torch.device("cpu"))
    (loss_mask, grads_mask), (loss_plain, grads_plain) = results
    torch.testing.assert_close(loss_plain, loss_mask, rtol=0, atol=1e-6)
    for a, b in zip(grads_plain, grads_mask):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- generation ------------------------------------------------------------------------------------------------


def greedy(model, ids, n, **kw):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)[0, len(ids):]


def test_kv_cache_equals_full_recomputation(model, tokenizer):
    ids = tokenizer.encode("医生: 孩子咳嗽几天了？\n患者: 三天了")
    cached = greedy(model, ids, 20)
    full = greedy(model, ids, 20, use_cache=False)
    assert torch.equal(cached, full)
    # and by hand: argmax of a fresh full forward at every step
    seq = list(ids)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(ids):] == cached.tolist()


def test_left_padded_batch_equals_each_alone(model, tokenizer):
    prompts = [tokenizer.encode(s) for s in ["患者: 发烧", "医生: 孩子咳嗽几天了？\n患者: 三天了，晚上咳得厉害", "hi"]]
    width = max(map(len, prompts))
    batch = torch.tensor([[tokenizer.eod_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.eod_id)
    for row, p in enumerate(prompts):
        assert out[row, width:].tolist() == greedy(model, p, 12).tolist()


def test_generation_stops_at_im_end(model, tokenizer):
    """Make <|im_end|> the likeliest next token after three steps by editing lm_head, then check the stop."""
    ids = tokenizer.encode("hello")
    first = greedy(model, ids, 3).tolist()
    edited = QWenLMHeadModel(model.config).eval()
    edited.load_state_dict(model.state_dict())
    with torch.no_grad():
        hidden = edited.transformer(torch.tensor([ids + first])).last_hidden_state[0, -1]
        edited.lm_head.weight[tokenizer.im_end_id] = hidden / hidden.norm() * 1e3
    out = edited.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                          eos_token_id=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id],
                          pad_token_id=tokenizer.eod_id)[0, len(ids):].tolist()
    assert tokenizer.im_end_id in out and len(out) < 30
    assert decode_tokens(ids + out, tokenizer, 0, len(ids)) == tokenizer.decode(out[:out.index(tokenizer.im_end_id)]).strip()


def test_stop_words_processor_forces_eos():
    proc = StopWordsLogitsProcessor([[151645], [151644], [5, 6]], eos_token_id=151643)
    scores = torch.zeros(3, 151936)
    out = proc(torch.tensor([[1, 151645], [1, 2], [4, 5, 6][-2:]]), scores)
    assert out[0, 151643] == 2 ** 15 and out[1, 151643] == 0 and out[2, 151643] == 2 ** 15
    with pytest.raises(ValueError):
        StopWordsLogitsProcessor([[]], eos_token_id=1)


def test_generate_and_chat_take_stop_words_ids(model, tokenizer):
    """Qwen's generate() and chat() API: after a stop sequence in the output, eos is forced next step."""
    ids = tokenizer.encode("hello")
    free = greedy(model, ids, 6).tolist()
    eos = tokenizer.eod_id
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                         stop_words_ids=[free[1:3]])[0, len(ids):].tolist()
    assert out == free[:3] + [eos]  # the two-token sequence ended at step 3, so step 4 is eos
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                              stop_words_ids=[free[:1]])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=config)[0, len(ids):].tolist()
    assert out == free[:1] + [eos]  # from generation_config.stop_words_ids
    _, ctx = make_context(tokenizer, "你好")
    chat_free = greedy(model, ctx, 4).tolist()
    stops = {tokenizer.im_end_id, tokenizer.im_start_id, eos}
    assert not stops & set(chat_free[:3])  # so it is the stop words that end the answer below
    response, _ = model.chat(tokenizer, "你好", None, "You are a helpful assistant.", [chat_free[:2]],
                             max_new_tokens=4, do_sample=False)  # Qwen's positional order: system, stop_words_ids
    assert response == tokenizer.decode(chat_free[:2]).strip()


def test_rotary_tables_stay_fp32_after_a_cast():
    """model.half() / .bfloat16() round the inv_freq buffer; the tables must still be the fp32 ones."""
    from qwen1_8.modeling_qwen import RotaryEmbedding

    rotary = RotaryEmbedding(128)
    positions = torch.arange(2048)[None]
    cos, sin = rotary(positions, [1.0])
    for dtype in (torch.bfloat16, torch.float16):
        cast_cos, cast_sin = rotary.to(dtype)(positions, [1.0])
        assert torch.equal(cast_cos, cos) and torch.equal(cast_sin, sin)


def test_make_context_history_and_window(tokenizer):
    raw, ctx = make_context(tokenizer, "现在呢？", history=[("你好", "你好！"), ("头疼", "多久了？")])
    assert raw.endswith("<|im_start|>user\n现在呢？<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ctx) == raw
    _, short = make_context(tokenizer, "现在呢？", history=[("你好", "你好！"), ("头疼", "多久了？")], max_window_size=30)
    assert len(short) < len(ctx) and tokenizer.decode(short).count("<|im_start|>user") == 2


def test_chat_answers(model, tokenizer):
    response, history = model.chat(tokenizer, "你好", history=None, max_new_tokens=8, do_sample=False)
    assert isinstance(response, str) and history == [("你好", response)]
    raw, ctx = make_context(tokenizer, "你好")
    expected = greedy(model, ctx, 8).tolist()
    stops = {tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id}
    cut = next((i for i, t in enumerate(expected) if t in stops), len(expected))
    assert response == tokenizer.decode(expected[:cut]).strip()


# ---- the cached forward of batched generation: RowKVCache, prefill, decode_step -----------------------------------


def check_cached_forward(core, reference, static_width):
    """Three sequences in the rows of one cache, at different positions: a prompt prefilled (one of them in two
    parts), then decoding steps, with the first row dropped midway and the last moved into its place (as the engine
    compacts). Every step's logits are the plain forward's at that position. `core` is the QWenLMHeadModel,
    `reference` what is called for the plain forward (the model, or its PEFT wrapper)."""
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 5000, (n,), generator=generator).tolist() for n in (15, 20, 11)]
    prompts = [6, 12, 3]  # tokens up to the first decoding step, which feeds the last of them
    cache = core.row_cache(3, 64)
    with torch.inference_mode():
        for row, (seq, p) in enumerate(zip(sequences, prompts)):
            parts = [(0, 5), (5, p - 1)] if row == 1 else [(0, p - 1)]  # the second part attends to the first
            for start, end in parts:
                core.prefill(torch.tensor(seq[start:end]), cache, row, start)
        live = [0, 1, 2]  # the sequence each cache row holds
        for step in range(8):
            if step == 4:
                cache.move_row(2, 0)
                live = [2, 1]
            positions = [prompts[s] - 1 + step for s in live]
            tokens = [sequences[s][pos] for s, pos in zip(live, positions)]
            width = cache.capacity if static_width else max(positions) + 1
            logits = core.decode_step(torch.tensor(tokens), torch.tensor(positions), cache, width)  # (A, V)
            assert logits.shape == (len(live), core.config.vocab_size)
            for row, (s, pos) in enumerate(zip(live, positions)):
                plain = reference(input_ids=torch.tensor([sequences[s][:pos + 1]])).logits[0, -1].float()
                torch.testing.assert_close(logits[row], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static_width", [False, True])
def test_cached_forward_equals_the_plain_forward(model, static_width):
    check_cached_forward(model, model, static_width)


@pytest.mark.parametrize("static_width", [False, True])
def test_cached_forward_equals_the_plain_forward_through_lora(tiny_ckpt, static_width):
    """Under a PEFT wrapper (the engine unwraps it; the LoRA layers stay in place and count)."""
    from peft import LoraConfig, get_peft_model

    base = QWenLMHeadModel.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "w1", "w2"],
                                              lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM"))
    wrapped.eval()
    with torch.inference_mode():  # the LoRA weights are not a no-op
        ids = torch.tensor([[1, 2, 3]])
        with wrapped.disable_adapter():
            without = wrapped(input_ids=ids).logits
        assert not torch.allclose(wrapped(input_ids=ids).logits, without)
    check_cached_forward(wrapped.get_base_model(), wrapped, static_width)


def test_cached_forward_with_4bit_layers(tiny_ckpt):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = QWenLMHeadModel.from_pretrained(tiny_ckpt, quantization_config=quant, dtype=torch.float32,
                                            device_map={"": "cpu"}).eval()
    check_cached_forward(model, model, static_width=False)


def test_a_row_cache_stays_within_seq_length(model):
    with pytest.raises(ValueError, match="at most seq_length"):
        model.row_cache(1, model.config.seq_length + 64)


# ---- training ---------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_same_gradients():
    model = random_model(seed=3).train()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    from medextract.qlora import enable_activation_checkpointing  # train.py's switch, for either transformers API

    enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", False) or getattr(model, "is_gradient_checkpointing", False)
    checkpointed = grads()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_4bit_nf4_lora_step_on_cpu(tiny_ckpt, tokenizer):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    import bitsandbytes as bnb

    from medextract.qlora import enable_activation_checkpointing

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = QWenLMHeadModel.from_pretrained(tiny_ckpt, quantization_config=quant, dtype=torch.float32,
                                            device_map={"": "cpu"})
    four_bit = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == {"c_attn", "c_proj", "w1", "w2"}  # lm_head stays full precision
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    enable_activation_checkpointing(model)  # as train.py does it
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=sorted(four_bit), lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    ids = torch.tensor([tokenizer.encode("医生: 孩子咳嗽几天了？\n患者: 三天了")] * 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_auto_classes_load_without_remote_code(tiny_ckpt):
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers import AutoTokenizer

    assert isinstance(AutoConfig.from_pretrained(tiny_ckpt), QWenConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tiny_ckpt), QWenLMHeadModel)
    assert isinstance(AutoTokenizer.from_pretrained(tiny_ckpt), QWenTokenizer)


def test_make_tiny_writes_the_real_layout(tiny_ckpt):
    assert set(os.listdir(tiny_ckpt)) == {"config.json", "generation_config.json", "model.safetensors",
                                          "qwen.tiktoken", "tokenizer_config.json"}
    with open(os.path.join(tiny_ckpt, "generation_config.json"), encoding="utf-8") as f:
        gen = json.load(f)
    assert gen["chat_format"] == "chatml" and gen["eos_token_id"] == 151643
    assert len(QWenTokenizer.from_pretrained(tiny_ckpt)) == 151851


def test_skip_logits_gives_the_same_loss_and_gradients():
    model = random_model(seed=4).train()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, :6] = -100

    def run(**kw):
        model.zero_grad()
        out = model(ids, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    full, g_full = run()
    lean, g_lean = run(skip_logits=True)
    assert lean.logits is None and torch.allclose(full.loss, lean.loss, atol=1e-6)
    for name in g_full:
        assert torch.allclose(g_full[name], g_lean[name], atol=1e-6), name


def test_make_tiny_gives_its_files_the_users_usual_permissions(tmp_path):
    """What the umask gives (here 027), not the 0700 folder of mkdtemp nor the 0600 weights safetensors writes."""
    from qwen1_8.make_tiny import make_tiny

    old = os.umask(0o027)
    try:
        out = make_tiny(str(tmp_path / "tiny"), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, vocab_size=256)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o750
    assert {os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)} == {0o640}
