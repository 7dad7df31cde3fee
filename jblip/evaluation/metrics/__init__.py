"""The benchmarks' official metrics: VQA accuracy, exact match, choice accuracy, caption scores."""
