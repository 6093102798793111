"""Writes small Parquet files in the layouts Hugging Face datasets use, for Kiln's Parquet reader
tests (crates/data/tests/fixtures/): nested message lists (list<struct<role, content>>), plain
string columns, explicit preference pairs, a `text` column among others, snappy and zstd
compression, several row groups, and a null where a string is expected.

Run: pip install pyarrow && python tools/golden/make_parquet_fixtures.py
"""
import os

import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "data", "tests", "fixtures")
os.makedirs(OUT, exist_ok=True)

messages = pa.table({
    "messages": [
        [{"role": "user", "content": "What color is the cup?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}],
    ],
    "source": ["x", "y", "z"],
})
pq.write_table(messages, os.path.join(OUT, "sft_messages.parquet"), compression="snappy", row_group_size=2)

alpaca = pa.table({"instruction": ["Add 1 and 2", "Say hi"], "input": ["", "politely"], "output": ["3", "Hello!"]})
pq.write_table(alpaca, os.path.join(OUT, "sft_alpaca.parquet"), compression="zstd")

prefs = pa.table({"prompt": ["q1", "q2"], "chosen": ["good", "fine"], "rejected": ["bad", "worse"]})
pq.write_table(prefs, os.path.join(OUT, "prefs.parquet"), compression="gzip")

text = pa.table({
    "id": [1, 2, 3, 4],
    "text": ["The first document.", "The second one,\nover two lines.", None, "The fourth."],
    "meta": [{"lang": "en"}] * 4,
})
pq.write_table(text, os.path.join(OUT, "text.parquet"), compression="lz4", row_group_size=3)
print("wrote", sorted(f for f in os.listdir(OUT) if f.endswith(".parquet")))
