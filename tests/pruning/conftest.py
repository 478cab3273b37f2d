"""Tiny BERT / DistilBERT models, a local WordPiece tokenizer and synthetic sentences:
everything built offline in a temp dir (no downloads)."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_WORDS = (
    "the a an this that movie film story plot actor actress scene music score camera "
    "good great bad awful fine dull boring brilliant funny sad long short slow fast "
    "was is were be very quite rather not never always really so too and but or "
    "love hate like enjoy watch see saw felt feel made make script ending start "
    "character characters director performance performances cast role roles"
)
WORDS = _WORDS.split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP
    workers spin-wait: one thread makes this suite several times faster. Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    vocab = SPECIAL + sorted(set(WORDS)) + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(vocab + list("abcdefghijklmnopqrstuvwxyz")))
    # transformers 5 ignores BertTokenizerFast(vocab_file=...) (a 5-token vocabulary that maps
    # every word to [UNK]); the vocab dict is honoured
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert tok.vocab_size == len(vocab)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def sentences():
    return make_sentences(300, seed=1)


def tiny_bert(
    kind: str = "seqcls",
    layers: int = 3,
    hidden: int = 32,
    inter: int = 96,
    seed: int = 0,
    vocab_size: int = 128,
):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=inter,
        max_position_embeddings=64,
        num_labels=2,
    )
    cls = {
        "seqcls": transformers.BertForSequenceClassification,
        "qa": transformers.BertForQuestionAnswering,
        "base": transformers.BertModel,
    }[kind]
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


def tiny_distilbert(
    kind: str = "seqcls",
    layers: int = 2,
    hidden: int = 32,
    inter: int = 64,
    seed: int = 0,
    vocab_size: int = 128,
):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(
        vocab_size=vocab_size,
        dim=hidden,
        n_layers=layers,
        n_heads=4,
        hidden_dim=inter,
        max_position_embeddings=64,
        num_labels=2,
    )
    cls = {
        "seqcls": transformers.DistilBertForSequenceClassification,
        "qa": transformers.DistilBertForQuestionAnswering,
        "base": transformers.DistilBertModel,
    }[kind]
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


def tiny_roberta(
    kind: str = "seqcls",
    layers: int = 2,
    hidden: int = 32,
    inter: int = 64,
    seed: int = 0,
    vocab_size: int = 128,
):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=inter,
        max_position_embeddings=70,
        num_labels=2,
        pad_token_id=0,
    )
    cls = {
        "seqcls": transformers.RobertaForSequenceClassification,
        "qa": transformers.RobertaForQuestionAnswering,
        "base": transformers.RobertaModel,
    }[kind]
    model = cls(cfg).eval()
    _spread_weights(model)
    return model


def _spread_weights(model: torch.nn.Module) -> None:
    """Random-init weights (std 0.02) make every neuron alike; widen them so that scores and
    reconstruction errors are not all ties."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


@pytest.fixture
def bert(tokenizer):
    return tiny_bert(vocab_size=tokenizer.vocab_size)


@pytest.fixture
def distilbert(tokenizer):
    return tiny_distilbert(vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="session")
def builders():
    """Model builders by family name: builders["bert"](kind, vocab_size=...)."""
    return {"bert": tiny_bert, "distilbert": tiny_distilbert, "roberta": tiny_roberta}


@pytest.fixture(scope="session")
def sentence_maker():
    return make_sentences


def tiny_decoder(
    family: str = "llama",
    layers: int = 3,
    hidden: int = 64,
    inter: int = 176,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    vocab_size: int = 128,
    context: int = 64,
):
    """A tiny causal LM of the LLaMA family (grouped-query attention: ``kv_heads`` <
    ``heads``), random weights widened like the encoders'."""
    import transformers

    torch.manual_seed(seed)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    cfg = getattr(transformers, f"{prefix}Config")(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    _spread_weights(model)
    return model


DECODER_FAMILIES = ("llama", "mistral", "qwen2")


def token_batch(n: int = 48, width: int = 24, vocab_size: int = 128, seed: int = 0) -> dict:
    """Pre-tokenized random sequences with some right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, width), generator=gen)
    mask = torch.ones_like(ids)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=gen)
    mask[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def word_level_tokenizer(pad: bool = False):
    """A fast word-level tokenizer over ``WORDS`` with BOS/EOS and (``pad``) a padding token;
    LLaMA-style when ``pad`` is False (no padding token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    if pad:
        vocab["<pad>"] = 3
    for w in sorted(set(WORDS)):
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


@pytest.fixture
def llama_dir(tmp_path):
    """A saved tiny LLaMA (GQA) with its tokenizer, as a user's local checkpoint."""
    tok = word_level_tokenizer()
    model = tiny_decoder("llama", vocab_size=len(tok))
    d = tmp_path / "llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
