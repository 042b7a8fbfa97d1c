"""Node: Save Attention Maps (the recording of one sampler output -> the storage contract's files)."""
from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..wan_capture import SaveOptions, __version__
from ..wan_capture.recording.save import file_count, save_recording
from .attach_node import AttentionRecorder
from .recording import recordings
from .widgets import settings


class SaveAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanSaveAttention",
            display_name="Save Attention Maps",
            category="Wan Attention Capture",
            description="Writes the recording of the connected sampler output to "
                        "output/<batch_name>/attention_maps/<prompt_id>_vid<NNN>/ (arrays + metadata JSON), as it "
                        "was recorded (steps, precision and pooling are set where recording is: Attach Attention "
                        "Recorder and Attention Recording Options). Fed from Load Attention Maps, it writes a copy "
                        "of the loaded videos (into another batch, or under another prompt_id).",
            is_output_node=True,
            inputs=[
                AttentionRecorder.Input("recorder", tooltip="Attach Attention Recorder's recorder, or Load Attention "
                                                            "Maps to copy saved maps."),
                io.Latent.Input("samples", optional=True,
                                tooltip="The LATENT output of the sampler that used the recorder's MODEL (not needed "
                                        "for saved maps)."),
                io.Image.Input("images", optional=True,
                               tooltip="The decoded frames: saved beside the maps for the viewer to draw over."),
                io.String.Input("batch_name", default="wan_attention", optional=True,
                                tooltip="Folder under ComfyUI's output: <batch_name>/attention_maps/."),
                io.Combo.Input("storage_format", options=["numpy", "torch"], default="numpy", optional=True,
                               tooltip="numpy: .npy files (what AttentionAnalyzer and the viewer read); torch: .pt."),
                io.Boolean.Input("compress", default=False, optional=True, tooltip="gzip each array (.npy.gz / .pt.gz)."),
                io.Int.Input("video_number", default=1, min=0, max=99999, optional=True,
                             tooltip="Number of the first video (batch items count up from it)."),
                io.String.Input("prompt_id", default="", optional=True,
                                tooltip="Empty: the token tracker's id (prompt_000)."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Off: a video folder that exists already is kept and this run is written "
                                         "to a new name (<video>_2, ...), reported in the output. On: the folder is "
                                         "replaced as a whole."),
            ],
            outputs=[io.String.Output(display_name="attention_maps_path")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, recorder, samples=None, images=None, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        videos = recordings(recorder, samples)
        first = videos[0].summary
        opts = SaveOptions(storage_format=kw["storage_format"], compress=kw["compress"],
                           storage_dtype=first.get("dtype", "torch.float16").replace("torch.", ""),
                           video_number=kw["video_number"], prompt_id=kw["prompt_id"] or None,
                           if_exists="replace" if kw["overwrite"] else "new_name")
        out_dir = folder_paths.get_output_directory()
        frames = None if images is None else images.float().cpu().numpy()
        if frames is not None and len(frames) % len(videos):
            raise ValueError(f"{len(frames)} decoded frames do not split into the recording's {len(videos)} videos")
        per = None if frames is None else len(frames) // len(videos)
        progress = _file_progress(sum(file_count(v, opts, per) for v in videos), cls.hidden.unique_id)
        saved = [save_recording(v, out_dir, kw["batch_name"], opts, progress=progress,
                                version=__version__, frames=None if frames is None else frames[b * per:(b + 1) * per],
                                batch_index=b) for b, v in enumerate(videos)]
        rel = lambda p: os.path.relpath(p, out_dir).replace(os.sep, "/")  # noqa: E731
        ui = {"attention_maps": [{"video_id": v.video_id, "subfolder": rel(v.path), "status": v.status,
                                  "files": [rel(f) for f in v.files]} for v in saved]}
        root = os.path.dirname(saved[0].path)
        return io.NodeOutput(rel(root), ui=ui)


NODES = [SaveAttentionMaps]


PROGRESS_TEXTS = 20  # "writing files k/N" lines sent over a save (ComfyUI's bar alone reads "step k/N")


def _file_progress(total: int, node_id):
    """The Save node's progress: ComfyUI's bar, and a text under the node that says what is counted."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):  # no server (scripts, tests): the bar only
        server = None
    every, done = max(1, total // PROGRESS_TEXTS), [0]

    def update(_path: str) -> None:
        done[0] += 1
        pbar.update(1)
        if server is not None and node_id is not None and (done[0] % every == 0 or done[0] == total):
            server.send_progress_text(f"writing files {done[0]}/{total}", node_id)
    return update
