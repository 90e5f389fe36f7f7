"""A stage plugin, as an operator would write one: one class plus one registry entry, and nothing
else in the project edited. Named in the app config's ``stage_modules``; every process imports it.

It hands the decoded frames on unchanged, after the decoder and before the video encoder.
"""

from pipelines.registry import StageResources, StageSpec, register_stage


class PassThroughStage:
    """Returns the frames it is given."""

    def __call__(self, frames, params):
        return frames


PASSTHROUGH = register_stage(
    StageSpec(
        name="passthrough", config_key="passthrough", deployment="PassThrough", factory=PassThroughStage,
        inputs=("frames",), output="frames", resources=StageResources(num_cpus=0.25, max_ongoing_requests=4),
        progress_share=1, description="Hands the decoded frames on unchanged.",
    ),
    after="decode",
)
