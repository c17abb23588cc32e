"""DP model training from the researcher's side: start a job at a site, watch it, get the model.

The site trains; what comes back is the DP-trained weights (safetensors), the accountant's
(epsilon, delta) and a DP evaluation on held-out patients. Interrupting the cell (Ctrl-C, or the
stop button) cancels the job; the site charges only what its steps spent.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from veil.extras import needs
from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilError
from veil.kernel.result import Result
from veil.wire import JobInfo, TrainRequest


class VeilTrainingFailed(VeilError):
    """The site could not finish the job; `job.error` says why, and what was spent was charged."""

    def __init__(self, site: str, job: JobInfo) -> None:
        super().__init__("training_failed", f"training job {job.id} at site '{site}' failed: {job.error}. "
                         f"It was charged epsilon {job.epsilon:.4g} of the {job.target_epsilon:g} reserved.")
        self.job = job


@dataclass(frozen=True)
class TrainedModel:
    """A model trained with DP-SGD at a site: its weights, its privacy cost and its DP evaluation."""

    site: str
    job: JobInfo
    weights: bytes

    @property
    def epsilon(self) -> float:
        """What the site's accountant says training spent (at `delta`)."""
        return self.job.epsilon

    @property
    def delta(self) -> float:
        return self.job.delta

    @property
    def cancelled(self) -> bool:
        return self.job.state == "cancelled"

    @property
    def evaluation(self) -> Result | None:
        """The DP release of held-out accuracy (or squared error), with its interval and receipt."""
        return Result.of(self.job.evaluation) if self.job.evaluation is not None else None

    def module(self) -> Any:
        """The trained `torch.nn.Module`, rebuilt from the spec, layout (and a custom model's checked graph)
        stored in the weights' metadata; needs torch (`pip install "veil[train]"`)."""
        with needs("rebuilding a trained model"):
            from veil.models.build import trained_module
        return trained_module(self.weights)

    def save(self, path: str) -> None:
        """Write the weights as a .safetensors file."""
        with open(path, "wb") as out:
            out.write(self.weights)

    def __repr__(self) -> str:
        return (f"<TrainedModel from {self.site}, job {self.job.id} {self.job.state}: epsilon {self.epsilon:.3g} "
                f"at delta {self.delta:g}>")


def run_job(client: SiteClient, request: TrainRequest, poll: float = 0.5, progress: bool = True) -> TrainedModel:
    """Start `request` at the client's site and follow it to the end; Ctrl-C cancels it."""
    job = client.train(request)
    bar = tqdm(total=request.train.epochs, unit="epoch", desc=f"{client.name} DP-SGD", disable=not progress)
    try:
        while job.state == "running":
            time.sleep(poll)
            job = client.job(job.id)
            bar.n = job.epoch
            bar.set_postfix(epsilon=f"{job.epsilon:.3g}/{job.target_epsilon:g}", steps=f"{job.progress:.0%}")
    except KeyboardInterrupt:
        job = client.cancel_job(job.id)
        while job.state == "running":
            time.sleep(poll)
            job = client.job(job.id)
    finally:
        bar.close()
    if job.state == "failed":
        raise VeilTrainingFailed(client.name, job)
    if job.error:  # stopped at the site's time limit: the model of the steps taken comes back
        warnings.warn(f"site '{client.name}': {job.error}", stacklevel=2)
    return TrainedModel(client.name, job, client.job_weights(job.id))
