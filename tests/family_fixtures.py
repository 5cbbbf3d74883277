"""Tiny random teachers of every supported encoder family, with real tokenizers built offline.

BERT-style families (bert, electra, distilbert) use the built-in teacher's WordPiece vocabulary; RoBERTa-style
ones get a byte-level BPE (roberta) or a sentencepiece-style unigram tokenizer (xlm-roberta, camembert) trained here on a few
hundred words, as their real tokenizers are.
"""
import random

import torch
import transformers as T

from distill_fixtures import WORDS

FAMILY_CASES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "electra-projected", "distilbert")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _lines(count=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(count)]


def family_tokenizer(case: str):
    from wid.teachers import default_teacher_path

    if case == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        trained = ByteLevelBPETokenizer()
        trained.train_from_iterator(_lines(), vocab_size=320, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
        cls = T.RobertaTokenizerFast
    elif case in ("xlm-roberta", "camembert"):
        from tokenizers import SentencePieceUnigramTokenizer

        trained = SentencePieceUnigramTokenizer()
        trained.train_from_iterator(_lines(), vocab_size=120, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False)
        cls = T.XLMRobertaTokenizerFast if case == "xlm-roberta" else T.CamembertTokenizerFast
    elif case == "distilbert":
        return T.DistilBertTokenizerFast.from_pretrained(default_teacher_path())
    else:
        return T.AutoTokenizer.from_pretrained(default_teacher_path())
    return cls(tokenizer_object=trained._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
               unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def family_config(case: str, vocab_size: int, hidden: int = 12, heads: int = 3, intermediate: int = 20, layers: int = 2,
                  positions: int = 64):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate)
    if case == "bert":
        return T.BertConfig(max_position_embeddings=positions, **common)
    if case in ("roberta", "xlm-roberta", "camembert"):
        cls = {"roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig, "camembert": T.CamembertConfig}[case]
        return cls(max_position_embeddings=positions + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **common)
    if case == "electra":
        return T.ElectraConfig(embedding_size=hidden, max_position_embeddings=positions, **common)
    if case == "electra-projected":
        return T.ElectraConfig(embedding_size=hidden * 2 // 3, max_position_embeddings=positions, **common)
    if case == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
                                  max_position_embeddings=positions)
    raise ValueError(case)


def family_teacher(case: str, vocab_size: int, with_head: bool = True, seed: int = 0, **widths):
    config = family_config(case, vocab_size, **widths)
    torch.manual_seed(seed)
    factory = T.AutoModelForMaskedLM if with_head else T.AutoModel
    return factory.from_config(config).eval()


def write_family_teacher(path, case: str, with_head: bool = True, seed: int = 0):
    tokenizer = family_tokenizer(case)
    model = family_teacher(case, len(tokenizer), with_head, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
