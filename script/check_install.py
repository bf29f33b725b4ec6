"""Check an installed environment before anyone relies on it; exit 1 if broken.

- pip sees no conflicting requirements, except the torch pins of chatterbox-tts
  and this project when another torch pair was installed on purpose;
- the watermarker loads (resemble-perth imports pkg_resources: setuptools < 81);
- the model code and the server import;
- and it prints the torch pair, its CUDA and the GPU kernels it carries.

Run with the environment's python: script/setup and the Dockerfile do.
"""

import re
import subprocess
import sys

# "chatterbox-tts 0.1.7 has requirement torch==2.6.0, but you have torch 2.8.0."
TORCH_PIN = re.compile(r" has requirement torch(audio)?[=<>!~ ;]")


def conflicts() -> list:
    check = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True
    )
    print(check.stdout, end="")
    return [
        line
        for line in check.stdout.splitlines()
        if line.strip() and "No broken" not in line and not TORCH_PIN.search(line)
    ]


def main() -> None:
    broken = conflicts()
    if broken:
        sys.exit("pip check: conflicting requirements:\n" + "\n".join(broken))

    import perth

    if perth.PerthImplicitWatermarker is None:
        sys.exit("resemble-perth cannot load its watermarker (setuptools >= 81?)")

    import chatterbox.tts_turbo  # noqa: F401
    import torch
    import torchaudio

    import wyoming_chatterbox.__main__  # noqa: F401

    kernels = getattr(torch._C, "_cuda_getArchFlags", lambda: "none")() or "none"
    print(
        f"torch {torch.__version__}, torchaudio {torchaudio.__version__}, "
        f"CUDA {torch.version.cuda}, GPU kernels for: {kernels}"
    )
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            print(
                f"cuda:{index} {torch.cuda.get_device_name(index)}, compute "
                f"capability {major}.{minor}"
            )
    else:
        print("CUDA available: False (the server runs on the CPU here)")


if __name__ == "__main__":
    main()
