"""The teacher of a distilled model: a trained run or a published ONNX model, run in ONNX Runtime.

A teacher is named by a run directory (its weights are exported to ONNX once, into the
student's run) or by ``NAME[:VERSION]`` in a model repository (the published artifact itself,
checked against its manifest's sha256, so a served model can teach without torch weights). Its
identity — name, version, the sha256 of what computed the logits — keys the transfer set's
cache and is recorded in the student's manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from export.config import CONFIG_FILE, LABELS_FILE, TOKENIZER_FILE, WEIGHTS_FILE, RunConfig
from service.repo.graph import check_signature, open_session, run_logits, session_options
from service.repo.layout import ModelVersion, latest_version, verify_artifact, verify_file, versions
from service.repo.manifest import ManifestError, Precision, sha256_file
from service.repo.tokenization import TextTokenizer, pad_batch

log = logging.getLogger(__name__)

#: Where a run-directory teacher's exported graph is kept inside the student's run.
TEACHER_GRAPH_FILE = "teacher.onnx"
#: Texts per teacher batch; batches are formed from texts of similar length.
LABELLING_BATCH_SIZE = 64


class TeacherError(Exception):
    """A teacher that cannot be found, loaded or used for this student; one line."""


@dataclass(frozen=True)
class TeacherIdentity:
    """What taught a student, as its manifest records it."""

    kind: Literal["run", "repository"]
    name: str
    version: int | None
    sha256: str  # of the weights (run) or of the ONNX artifact (repository)
    precision: Precision
    architecture: str


@dataclass
class Teacher:
    identity: TeacherIdentity
    labels: list[str]
    tokenizer: TextTokenizer
    graph: Path | None  # None until a run teacher's graph is exported (only when labelling)
    run_dir: Path | None = None
    dataset: str | None = None
    seed: int | None = None

    def logits(self, texts: list[str], *, work_dir: Path, threads: int | None = None,
               progress: bool = False) -> np.ndarray:
        """float32 ``[len(texts), labels]``, in the order of ``texts``, from batches of texts
        of similar length (the teacher pays for padding like any transformer)."""
        session = open_session(self._graph(work_dir),
                               session_options(intra_op_threads=threads or 0, log_severity=3))
        check_signature(session)
        ids, _ = self.tokenizer.token_ids(texts)
        order = np.argsort([len(row) for row in ids], kind="stable")
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        bar = tqdm(total=len(texts), desc=f"teacher {self.identity.name} labelling",
                   unit="text", disable=not progress, leave=False)
        for start in range(0, len(order), LABELLING_BATCH_SIZE):
            rows = order[start : start + LABELLING_BATCH_SIZE]
            batch = pad_batch([ids[i] for i in rows], pad_id=self.tokenizer.pad_id)
            logits = run_logits(session, batch.input_ids, batch.attention_mask)
            if logits.shape[1] != len(self.labels):
                raise TeacherError(f"teacher {self.identity.name} gives {logits.shape[1]} "
                                   f"logits for its {len(self.labels)} labels")
            out[rows] = logits
            bar.update(len(rows))
        bar.close()
        return out

    def _graph(self, work_dir: Path) -> Path:
        if self.graph is not None:
            return self.graph
        from export.onnx_export import export_onnx_in_subprocess

        assert self.run_dir is not None
        target = work_dir / TEACHER_GRAPH_FILE
        # The graph is kept with the weights' sha256 beside it: a rerun reuses it.
        stamp = target.with_suffix(".weights-sha256")
        if not (target.is_file() and stamp.is_file()
                and stamp.read_text().strip() == self.identity.sha256):
            config = RunConfig.load(self.run_dir)
            log.info("exporting the teacher %s to ONNX for labelling", self.run_dir)
            export_onnx_in_subprocess(config.architecture, config.model,
                                      self.run_dir / WEIGHTS_FILE, target)
            stamp.write_text(self.identity.sha256 + "\n")
        self.graph = target
        return target


def is_run_directory(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def resolve_teacher(source: str, repository: Path, *, precision: Precision = "fp32"
                    ) -> Teacher:
    """The teacher ``source`` names: a run directory, else ``NAME[:VERSION]`` in
    ``repository``. Raises ``TeacherError`` naming what is missing."""
    path = Path(source)
    if path.is_dir():
        if not is_run_directory(path):
            raise TeacherError(f"teacher {source}: a directory but not a run directory (no "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE})")
        return _run_teacher(path)
    return _repository_teacher(source, repository, precision)


def _run_teacher(run_dir: Path) -> Teacher:
    try:
        config = RunConfig.load(run_dir)
        labels = json.loads((run_dir / LABELS_FILE).read_text(encoding="utf-8"))
        tokenizer = TextTokenizer.from_file(run_dir / TOKENIZER_FILE,
                                            config.tokenizer.max_length, config.pad_id)
    except (OSError, ValueError) as error:
        raise TeacherError(f"teacher run {run_dir}: unreadable ({error})") from error
    identity = TeacherIdentity("run", run_dir.resolve().name, None,
                               sha256_file(run_dir / WEIGHTS_FILE), "fp32", config.architecture)
    return Teacher(identity, labels, tokenizer, None, run_dir=run_dir,
                   dataset=config.data.source, seed=config.seed)


def _repository_teacher(source: str, repository: Path, precision: Precision) -> Teacher:
    name, _, version_text = source.partition(":")
    model = _find_version(repository, name, version_text, source)
    try:
        manifest = model.load_manifest()
        manifest.check_contract()
        artifact = manifest.artifact(precision)
        if artifact is None:
            have = ", ".join(a.precision for a in manifest.artifacts)
            raise TeacherError(f"teacher {name} v{model.version} has no {precision} artifact "
                               f"(it has {have})")
        if precision != "fp32" and not artifact.passed_gates:
            raise TeacherError(f"teacher {name} v{model.version}: its {precision} artifact "
                               "failed its export gates")
        graph = verify_artifact(model, artifact)
        tokenizer_path = verify_file(model.directory, manifest.tokenizer.file,
                                     manifest.tokenizer.sha256)
        tokenizer = TextTokenizer.from_file(tokenizer_path, manifest.tokenizer.max_length,
                                            manifest.tokenizer.pad_id)
    except ManifestError as error:
        raise TeacherError(f"teacher {source}: {error}") from error
    identity = TeacherIdentity("repository", name, model.version, artifact.sha256, precision,
                               manifest.architecture)
    return Teacher(identity, list(manifest.labels), tokenizer, graph,
                   dataset=manifest.training.dataset if manifest.training else None,
                   seed=manifest.training.seed if manifest.training else None)


def _find_version(repository: Path, name: str, version_text: str, source: str) -> ModelVersion:
    if not version_text:
        found = latest_version(repository, name)
        if found is None:
            raise TeacherError(f"teacher {source}: neither a run directory nor a model in "
                               f"{repository} (pass --teacher-repository, or a run directory)")
        return found
    if not (version_text.isascii() and version_text.isdigit()):
        raise TeacherError(f"teacher {source}: the version after ':' must be a number")
    for candidate in versions(repository, name):
        if candidate.version == int(version_text):
            return candidate
    raise TeacherError(f"teacher {source}: {repository} has no version {version_text} of "
                       f"{name}")


def label_order(teacher_labels: list[str], student_labels: list[str], *, teacher: str,
                data: str) -> np.ndarray:
    """Column indices that put the teacher's logits in the student's label order. The label
    sets must be the same; their order may differ (the columns are permuted)."""
    if sorted(teacher_labels) != sorted(student_labels) or len(set(teacher_labels)) != len(
            teacher_labels):
        raise TeacherError(f"the teacher {teacher} predicts labels {teacher_labels}, but the "
                           f"student's data {data} has labels {student_labels}: a teacher "
                           "must know exactly the student's labels")
    position = {label: index for index, label in enumerate(teacher_labels)}
    return np.array([position[label] for label in student_labels], dtype=np.int64)
