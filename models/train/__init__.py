"""Training pipeline for a small real MoE (Shakespeare, qwen3moe): see README.md. Needs torch."""
