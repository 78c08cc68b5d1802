from setuptools import setup

# The Triton code lives in the top-level folder kernels/ but installs as fastunet.kernels, so that no
# top-level module named `kernels` (an unrelated PyPI package) is ever installed.
setup(
    name="fastunet",
    version="0.1.0",
    description="Drop-in, Triton-accelerated replacement for denoising-diffusion-pytorch's Unet",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastunet", "fastunet.reference", "fastunet.kernels"],
    package_dir={"fastunet": "fastunet", "fastunet.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "numpy",
            "hypothesis",
            "matplotlib",  # bench/report.py draws report.png
            "denoising-diffusion-pytorch==2.3.4",
        ],
    },
)
