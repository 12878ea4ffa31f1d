from setuptools import find_packages, setup

setup(
    name="megatron_danube",
    version="0.1.0",
    description="Pretrain H2O-Danube-class language models on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_danube", "megatron_danube.*"]),
    install_requires=[
        # 0.16.1 is the newest release installable on Python 3.11 and the one CI tests;
        # the 0.16 line's CPU behaviour is what runtime/cpu_compat.py is written against.
        "megatron-core>=0.16.1,<0.17",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "nltk",
        "tensorboard",
        "psutil",
        "tqdm",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.45", "safetensors", "tokenizers"],
        "data": ["zstandard", "pyarrow"],
        "demo": ["mistral-common"],
        "test": [
            "pytest",
            "transformers>=4.45",
            "safetensors",
            "tokenizers",
            "zstandard",
            "pyarrow",
            "mistral-common",
        ],
    },
    entry_points={"console_scripts": ["danube-pretrain=megatron_danube.pretrain:main"]},
)
