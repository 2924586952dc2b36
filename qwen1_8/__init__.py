"""Our own Qwen-1.8B-Chat: config, tokenizer and model, checkpoint-compatible with the published weights, for
transformers 5.x without trust_remote_code. Importing the package registers model_type "qwen" with the Auto classes
(AutoConfig, AutoModelForCausalLM, AutoTokenizer).
"""
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel
from .tokenization_qwen import QWenTokenizer, packaged_vocab_file

AutoConfig.register("qwen", QWenConfig, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenModel", "QWenLMHeadModel", "QWenTokenizer", "packaged_vocab_file"]
