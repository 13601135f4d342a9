"""What eval.py and predict.py do: restore a trained model (from its checkpoint alone,
or a peer's weights file), score it on a split, or label new images. Everything
task-specific comes from the model's task (segjax/tasks)."""
