"""The model side: loading model and tokenizer (quantization, PEFT, attention) and merging adapters."""
