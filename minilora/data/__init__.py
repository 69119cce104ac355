"""Data: read rows (JSONL/JSON/CSV/Parquet/hub), tokenize them per task, and collate batches."""
from minilora.data.causal_lm import causal_lm_dataset
from minilora.data.chat import chat_dataset, show_masking
from minilora.data.classification import classification_dataset
from minilora.data.collate import Collator, Features
from minilora.data.qa import postprocess_qa_predictions, qa_dataset
from minilora.data.readers import Records, load_records, read_file
from minilora.data.seq2seq import seq2seq_dataset

__all__ = ["Collator", "Features", "Records", "causal_lm_dataset", "chat_dataset", "classification_dataset",
           "load_records", "postprocess_qa_predictions", "qa_dataset", "read_file", "seq2seq_dataset", "show_masking"]
