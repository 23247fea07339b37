"""A tiny OPT-style tokenizer for oracle checkpoints, trained here so tests need no downloads.

Byte-level BPE (any text encodes), OPT's special ids: `<s>` 0, `<pad>` 1, `</s>` 2 (both BOS and EOS, as in
facebook/opt-*), `<unk>` 3; every encoding starts with `</s>`, added by the post-processor.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, OPT's order

# Varied everyday English (questions, captions, counting, colours) so common words become single tokens and
# prompts such as "Question: how many cats are there? Answer:" encode to a handful of ids.
_CORPUS = """
Question: how many cats are there? Answer: there are two cats on the sofa.
Question: what is the man holding? Answer: the man is holding a red umbrella.
Question: what colour is the car? Answer: the car is blue and the door is open.
Question: where is the dog? Answer: the dog is sleeping under the wooden table.
Question: is it raining? Answer: no, the sky is clear and the sun is shining.
Question: how many people are in the picture? Answer: three people are standing near the bus stop.
Question: what are the children doing? Answer: the children are playing football in the park.
Question: what time of day is it? Answer: it looks like early morning, just after sunrise.
Question: what is on the plate? Answer: a slice of pizza, some salad and a small piece of bread.
Question: who is riding the bike? Answer: a young woman with a yellow helmet is riding the bike.
A photo of a cat sitting on a window sill, looking at the birds outside.
A picture of a kitchen with white cabinets, a silver fridge and a bowl of green apples.
Two dogs running along the beach while the waves roll onto the sand.
A red train crossing a bridge over a wide river in the mountains.
An old man reading a newspaper on a bench in the city square.
A group of friends having dinner together at a long table with candles.
A bowl of fruit: bananas, oranges, grapes, lemons and one big watermelon.
The street is busy with cars, taxis, buses and people walking to work.
A small boat floating on a calm lake surrounded by tall pine trees.
A black and white photograph of a lighthouse on a rocky coast at night.
A plane flying high above the clouds on a bright summer afternoon.
Four horses eating grass in a field next to a brown farm house.
A laptop, a cup of coffee and a notebook on a desk by the window.
Someone is cooking pasta in a large pot on the stove.
The girl is wearing a blue dress and holding a bunch of flowers.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Red, orange, yellow, green, blue, purple, pink, brown, black, white, grey.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
What is this? Where are they? Why is he smiling? When does the shop close? Which one is bigger?
Describe the image in detail. Write a short caption for this photo.
The quick brown fox jumps over the lazy dog near the river bank.
She said that they would meet again tomorrow at the train station.
There is a man, a woman and a child in front of the museum.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100 and 2024 appear in text.
Hello world! This is a test, and it should work: yes, it does.
Elephants, giraffes, zebras and lions live on the open plains of Africa.
The snow covered the roofs of the houses and the children built a snowman.
A woman is taking a photo of the tower with her phone.
Several sheep are grazing on the green hill under a cloudy sky.
A chef in a white hat is cutting vegetables in a restaurant kitchen.
"""


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train the tokenizer (deterministic for a given `vocab_size`) and optionally `save_pretrained` it."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line]
    tok.train_from_iterator(lines * 4, trainer=trainer)  # repeated so every pair clears min_frequency
    bos = "</s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A:0",
        pair=f"{bos} $A:0 {bos} $B:1",  # GPT2Tokenizer(add_bos_token=True) puts BOS before each segment
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
