"""The model as a graph: torch.fx tracing with quantizable layers kept whole, and what feeds what."""
