"""Question-answering data: loaders for HotpotQA-style sources, the generated fictional world,
stratified sampling and FlashRAG corpora. Plain Python, no Dagster."""
