"""Research code serving never imports: SynthVQA, training, evaluation and benchmarks."""
