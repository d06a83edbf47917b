"""The public Decision Transformers of Beeching & Simonini (2022): ``edbeeching/decision-transformer-gym-{env}-{quality}``
for Hopper, Walker2d, HalfCheetah x medium, medium-replay, expert, trained on the D4RL v2 datasets.

Their config.json holds the model only; the state normalisation the Hugging Face example applies (mean and std over
all states of the D4RL dataset, as the official DT code computes them) is printed on each model card and copied in
:data:`CARD_STATS` (sources: huggingface.co/edbeeching/decision-transformer-gym-<task>, README.md, read 2026-12-01).
Target returns: the HF example (transformers examples/research_projects/decision_transformer,
run_decision_transformer.py; huggingface.co/blog/decision-transformers) evaluates Hopper at 3600 with scale 1000 —
the official DT's first hopper target (benchmarks.md §2.3, §2.1); for Walker2d and HalfCheetah the project uses the
official DT's targets (5000 / 2500 and 12000 / 6000, envs/registry.py), as the HF example names none.

A checkpoint is recognised by its name (Hub id, a folder named after it, or the Hub cache's
``models--edbeeching--decision-transformer-gym-<task>`` folder), which names the dataset it was trained on.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_OWNER = "edbeeching"
_NAME = re.compile(r"decision-transformer-gym-(hopper|walker2d|halfcheetah)-(medium-replay|medium|expert)(?![\w-])")

# task -> (state_mean, state_std), from the model cards.
CARD_STATS: dict[str, tuple[list[float], list[float]]] = {
    "hopper-medium": (
        [1.311279, -0.08469521, -0.5382719, -0.07201576, 0.04932366, 2.1066856, -0.15017354, 0.00878345, -0.2848186,
         -0.18540096, -0.28461286],
        [0.17790751, 0.05444621, 0.21297139, 0.14530419, 0.6124444, 0.85174465, 1.4515252, 0.6751696, 1.536239,
         1.6160746, 5.6072536]),
    "hopper-medium-replay": (
        [1.2305138, -0.04371411, -0.44542956, -0.09370098, 0.09094488, 1.3694725, -0.19992675, -0.02286135,
         -0.5287045, -0.14465883, -0.19652697],
        [0.17565121, 0.06369286, 0.34383234, 0.19566889, 0.5547985, 1.0510299, 1.1583077, 0.79631287, 1.4802359,
         1.6540332, 5.108601]),
    "hopper-expert": (
        [1.3490015, -0.11208222, -0.5506444, -0.13188992, -0.00378754, 2.6071432, 0.02322114, -0.01626922,
         -0.06840388, -0.05183131, 0.04272673],
        [0.15980862, 0.0446214, 0.14307782, 0.17629202, 0.5912333, 0.5899924, 1.5405099, 0.8152689, 2.0173461,
         2.4107876, 5.8440027]),
    "walker2d-medium": (
        [1.218966, 0.14163373, -0.03704914, -0.1381431, 0.51382244, -0.0471911, -0.47288352, 0.04225416, 2.3948874,
         -0.03143199, 0.04466356, -0.02390724, -0.10134014, 0.09090938, -0.00419264, -0.12120572, -0.5497064],
        [0.12311358, 0.324188, 0.11456084, 0.26230657, 0.5640279, 0.22718786, 0.38373196, 0.7373677, 1.2387927,
         0.7980206, 1.5664079, 1.8092705, 3.0256042, 4.062486, 1.4586568, 3.744569, 5.585129]),
    "walker2d-medium-replay": (
        [1.2093647, 0.13264023, -0.14371201, -0.20465161, 0.55776125, -0.03231537, -0.2784661, 0.19130707,
         1.4701707, -0.12504704, 0.05649531, -0.09991033, -0.34034026, 0.03546293, -0.08934259, -0.2992438,
         -0.5984178],
        [0.11929835, 0.3562574, 0.258522, 0.42075422, 0.5202291, 0.15685083, 0.3677098, 0.7161388, 1.3763766,
         0.8632222, 2.6364644, 3.0134118, 3.720684, 4.867284, 2.6681626, 3.845187, 5.47683867]),
    "walker2d-expert": (
        [1.2384834, 0.19578537, -0.10475016, -0.18579608, 0.23003316, 0.022800924, -0.37383768, 0.337791, 3.925096,
         -0.0047428459, 0.025267061, -0.0039287535, -0.01736751, -0.48212224, 0.00035432147, -0.0037124525,
         0.0026285544],
        [0.06664903, 0.16980624, 0.17309439, 0.21843709, 0.74599105, 0.02410989, 0.3729872, 0.6226182, 0.9708009,
         0.72936815, 1.504065, 2.495893, 3.511518, 5.3656907, 0.79503316, 4.317483, 6.1784487]),
    "halfcheetah-medium": (
        [-0.06845774, 0.01641455, -0.18354906, -0.27624607, -0.34061527, -0.09339716, -0.21321271, -0.08774239,
         5.1730075, -0.04275195, -0.03610836, 0.14053793, 0.06049833, 0.09550975, 0.067391, 0.00562739, 0.01338279],
        [0.07472999, 0.30234998, 0.3020731, 0.34417078, 0.17619242, 0.5072056, 0.25670078, 0.32948127, 1.2574149,
         0.7600542, 1.9800916, 6.5653625, 7.4663677, 4.472223, 10.566964, 5.6719327, 7.498259]),
    # The card's std lists 18 numbers for this 17-dim state; the 18th ("5") is not a state dimension and is left out.
    "halfcheetah-medium-replay": (
        [-0.12880704, 0.37381196, -0.14995988, -0.23479079, -0.28412786, -0.13096535, -0.20157982, -0.06517727,
         3.4768248, -0.02785066, -0.01503525, 0.07697279, 0.01266712, 0.0273253, 0.02316425, 0.01043872,
         -0.01583941],
        [0.17019016, 1.2844249, 0.33442774, 0.36727592, 0.26092398, 0.4784107, 0.31814206, 0.33552638, 2.0931616,
         0.80374336, 1.9044334, 6.57321, 7.5728636, 5.0697494, 9.105554, 6.0856543, 7.253004]),
    "halfcheetah-expert": (
        [-0.04489148, 0.03232588, 0.06034835, -0.17081226, -0.19480659, -0.05751596, 0.09701628, 0.03239211,
         11.047426, -0.07997331, -0.32363534, 0.36297753, 0.42322603, 0.40836546, 1.1085187, -0.4874403, -0.0737481],
        [0.04002118, 0.4107858, 0.54217845, 0.41522816, 0.23796624, 0.62036866, 0.30100912, 0.21737163, 2.2105937,
         0.572586, 1.7255033, 11.844218, 12.06324, 7.0495934, 13.499867, 7.195647, 5.0264325]),
}


def hub_id(task: str) -> str:
    """``hopper-medium`` -> ``edbeeching/decision-transformer-gym-hopper-medium``."""
    return f"{HUB_OWNER}/decision-transformer-gym-{task}"


def trained_task(checkpoint: str) -> str | None:
    """The task (``walker2d-expert``) a public checkpoint was trained on, read from its Hub id or folder name
    (``.../decision-transformer-gym-walker2d-expert``, or the Hub cache's ``models--edbeeching--...``); None when the
    name is not one of the nine."""
    found = _NAME.search(str(checkpoint))
    return f"{found.group(1)}-{found.group(2)}" if found else None


def card_stats(task: str | None) -> dict:
    """{"trained_on", "state_mean", "state_std"} of a public checkpoint's model card ({} when not one of the nine)."""
    if task not in CARD_STATS:
        return {}
    mean, std = CARD_STATS[task]
    return {"trained_on": f"D4RL {task}-v2 (Gym -v3 data; model card statistics)", "dataset_source": "d4rl",
            "state_mean": list(mean), "state_std": list(std)}


def cached_snapshot(checkpoint: str) -> str:
    """A Hub id already in the local Hugging Face cache -> its snapshot folder (no network); anything else (a folder,
    an id not downloaded) unchanged."""
    if Path(checkpoint).exists() or checkpoint.count("/") != 1:
        return checkpoint
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(checkpoint, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id: from_pretrained reports it
        return checkpoint
