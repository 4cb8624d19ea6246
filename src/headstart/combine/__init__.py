"""Combining specialists on one base (docs/COMBINE.md): merge maths on task vectors (`merge_math`), LoRA
adapters as exact weight deltas (`lora_delta`), bundle merges with heads per task (`merge`), soups
(`soup`), multi-task training (`multitask`) and federated learning on Flower (`federated/`).

Importing this package stays cheap: torch, PEFT and Flower load inside the functions that use them.
"""
