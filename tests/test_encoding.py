import pytest

from edgecore import EdgecoreError, models
from edgecore.data import Dataset, Sample
from edgecore.encoding import IGNORE, Encoder, collate

CHOICES = ("business", "entertainment", "politics", "sport", "tech")


def _dataset(choices=CHOICES):
    sample = Sample(prompt="Shares rose " * 200, response=choices[0], group=choices[0])
    return Dataset(name="toy", train=[sample], validation=[], test=[], choices=choices,
                   instruction="What is the topic? Answer with one word.")


def test_long_text_is_cut_but_the_question_and_answer_survive():
    tokenizer = models.byte_tokenizer()
    encoder = Encoder(tokenizer, _dataset(), max_len=96)
    e = encoder.encode(_dataset().train[0])
    assert len(e.input_ids) == 96
    answer = tokenizer(" business", add_special_tokens=False)["input_ids"]
    assert e.input_ids[-len(answer):] == answer
    assert e.labels[-len(answer):] == answer and set(e.labels[:-len(answer)]) == {IGNORE}
    assert e.input_ids[e.answer_at + 1] == encoder.choice_token_ids[0]
    assert tokenizer.decode(e.input_ids[: e.answer_at + 1]).endswith("Answer:")


def test_language_modelling_sample_trains_on_every_token():
    tokenizer = models.byte_tokenizer()
    lm_data = Dataset(name="lm", train=[], validation=[], test=[], choices=None)
    e = Encoder(tokenizer, lm_data, max_len=16).encode(Sample(prompt="", response="To be or not to be, that is", group=""))
    assert len(e.input_ids) == 16 and e.labels == e.input_ids


def test_prompt_response_sample_masks_the_prompt():
    tokenizer = models.byte_tokenizer()
    lm_data = Dataset(name="lm", train=[], validation=[], test=[], choices=None)
    e = Encoder(tokenizer, lm_data, max_len=64).encode(Sample(prompt="Q: hi\nA:", response=" hello", group=""))
    n_prompt = len(tokenizer("Q: hi\nA:", add_special_tokens=False)["input_ids"])
    assert e.labels[:n_prompt] == [IGNORE] * n_prompt and e.labels[n_prompt:] == e.input_ids[n_prompt:]


def test_collate_pads_right_and_ignores_padding():
    tokenizer = models.byte_tokenizer()
    encoder = Encoder(tokenizer, _dataset(), max_len=200)
    short = Sample(prompt="Short.", response="tech", group="tech")
    batch = collate([encoder.encode(short), encoder.encode(_dataset().train[0])], tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0].sum() < batch.attention_mask[1].sum()
    assert (batch.labels[0][batch.attention_mask[0] == 0] == IGNORE).all()
    assert batch.choices.tolist() == [4, 0]


def test_answer_words_with_the_same_first_token_are_refused():
    with pytest.raises(EdgecoreError, match="distinct tokens"):
        Encoder(models.byte_tokenizer(), _dataset(choices=("sport", "sports")))


def test_unknown_answer_and_too_short_sequences_are_refused():
    encoder = Encoder(models.byte_tokenizer(), _dataset(), max_len=80)
    with pytest.raises(EdgecoreError, match="not one of the dataset's choices"):
        encoder.encode(Sample(prompt="x", response="weather", group=""))
    with pytest.raises(EdgecoreError, match="raise the sequence length"):
        Encoder(models.byte_tokenizer(), _dataset(), max_len=40)
