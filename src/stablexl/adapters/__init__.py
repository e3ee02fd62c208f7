"""Adapters applied on top of a loaded model: LoRA / LyCORIS files (`lora`) and the A1111 prompt tags that
name them (`tags`)."""
