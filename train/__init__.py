"""Distributed LoRA training job: Ray Train V2 TorchTrainer driving DeepSpeed ZeRO engines over peft models."""
