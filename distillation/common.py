"""What general and task distillation share: loading the frozen teacher and the student, the trained module that
pairs the student with its projection, and the student's output folder."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillation.losses import BackboneLoss, DistillConfig, check_compatible  # noqa: E402  (path insert)
from file_utils import (  # noqa: E402
    CheckpointError,
    PathLike,
    atomic_write,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
)
from modeling import (  # noqa: E402
    CONFIG_NAME,
    BertConfig,
    BertPreTrainedModel,
    EncoderStates,
    find_weights_file,
    record_states,
)

PROJECT_NAME = "project.bin"  # the reference's file name of the hidden-state projection


def model_config(path: PathLike, flag: str) -> BertConfig:
    """The BERT config of a model folder (its config.json) or of a config JSON file itself, errors naming ``flag``."""
    path = Path(path)
    config_file = path / CONFIG_NAME if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no {CONFIG_NAME} (give a model folder or a BERT config JSON)")
    return BertConfig.from_json_file(config_file)


def has_weights(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding model weights (not just a config)."""
    try:
        find_weights_file(Path(path))
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return False
    return True


def load_teacher(model_class: type[BertPreTrainedModel], path: PathLike, device: torch.device,
                 **model_kwargs: Any) -> BertPreTrainedModel:
    """The teacher: weights loaded (encoder strictly checked), in eval mode, frozen, never wrapped in DDP."""
    if not has_weights(path):
        raise FileNotFoundError(f"--teacher_model {path}: no weights (pytorch_model.bin or model.safetensors)")
    teacher = model_class.from_pretrained(path, config=model_config(path, "--teacher_model"), **model_kwargs)
    missing_head = [k for k in teacher.load_report.missing if not k.startswith(("bert.pooler.", "pooler."))]
    if missing_head:
        raise CheckpointError(f"--teacher_model {path} lacks {', '.join(missing_head)}: a teacher must be trained "
                              "for the task it teaches (fine-tune it first)")
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def check_student_weights(path: PathLike, config: BertConfig) -> None:
    """Refuse a student folder whose weights are another architecture than its config (layers, width), before
    training; ``from_pretrained`` would refuse it too, but only after the run has started writing."""
    weights = find_weights_file(Path(path))
    state = load_state_dict_file(weights)
    layers = {int(m.group(1)) for k in state if (m := re.search(r"encoder\.layer\.(\d+)\.", k))}
    word = next((v for k, v in state.items() if k.endswith("word_embeddings.weight")), None)
    found = {"num_hidden_layers": len(layers) or None, "hidden_size": None if word is None else int(word.shape[1])}
    differences = [f"{key} {value} in the weights, {getattr(config, key)} in the config" for key, value in found.items()
                   if value is not None and value != getattr(config, key)]
    if differences:
        raise CheckpointError(f"--student_model {path}: {weights.name} holds another architecture than its "
                              f"{CONFIG_NAME}: {'; '.join(differences)}")


def compatible(student: BertConfig, teacher: BertConfig, distill: DistillConfig, vocab_size: int,
               max_seq_length: int, args: Any) -> None:
    """Student and teacher read the same vocabulary and sequences, and the losses can compare them."""
    check_compatible(student, teacher, distill)
    for config, flag in ((student, "--student_model"), (teacher, "--teacher_model")):
        config.check_fits(vocab_size, max_seq_length, config_file=getattr(args, flag[2:]), vocab_file=args.vocab_file)


class StudentWithLoss(nn.Module):
    """The trained module of backbone distillation: the student and the loss's projection, so that one optimizer,
    one DDP wrapper and one checkpoint hold both. ``forward`` runs the student under ``record_states`` and returns
    the backbone loss against the teacher's recorded states, and its terms."""

    def __init__(self, student: BertPreTrainedModel, loss: BackboneLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor,
                teacher: EncoderStates) -> tuple[Tensor, dict[str, Tensor]]:
        with record_states(self.student) as states:
            self.student(input_ids, token_type_ids, attention_mask)
        return self.loss(states, teacher, attention_mask)


def teacher_states(teacher: nn.Module, batch: dict[str, Tensor]) -> tuple[EncoderStates, Any]:
    """The teacher's recorded states and outputs for one batch, without gradients."""
    with torch.no_grad(), record_states(teacher) as states:
        outputs = teacher(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return states, outputs


def save_student(student: BertPreTrainedModel, projection: nn.Module | None, output_dir: PathLike,
                 vocab_file: PathLike, distill_config: PathLike | None) -> None:
    """The student folder: config.json + pytorch_model.bin (loads in run_glue/run_squad/inference like any model),
    project.bin when a projection was trained, the vocabulary and the distillation config used."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output_dir)
    if projection is not None and any(True for _ in projection.parameters()):
        save_checkpoint(projection.state_dict(), output_dir / PROJECT_NAME)
    copies = {"vocab.txt": vocab_file, "distillation_config.json": distill_config}
    for name, source in copies.items():
        if source is not None and Path(source).resolve() != (output_dir / name).resolve():
            with atomic_write(output_dir / name) as handle:
                handle.write(Path(source).read_bytes())


def load_projection(projection: nn.Module, folder: PathLike) -> bool:
    """Load ``project.bin`` from a student folder into ``projection`` when both exist; returns whether it did."""
    path = Path(folder) / PROJECT_NAME
    if not path.is_file() or not any(True for _ in projection.parameters()):
        return False
    try:
        projection.load_state_dict(load_checkpoint(path), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this student and teacher: {str(exc).splitlines()[0]}") from None
    return True
