"""The model (floor 1 of docs/architecture.md): the eager MoE transformer and its parts. Each module
is imported by name (`moeinfer.model.moe`, `moeinfer.model.transformer`, ...); nothing here."""
