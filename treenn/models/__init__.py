"""treenn.models: a model zoo with torchvision's and timm's parameter names."""

from ._bert import (
    BertForMaskedLM as BertForMaskedLM,
    BertForSequenceClassification as BertForSequenceClassification,
    BertModel as BertModel,
)
from ._config import from_config as from_config
from ._generate import generate as generate
from ._gpt2 import (
    Conv1D as Conv1D,
    GPT2LMHeadModel as GPT2LMHeadModel,
    GPT2Model as GPT2Model,
)
from ._llama import (
    LlamaForCausalLM as LlamaForCausalLM,
    LlamaModel as LlamaModel,
)
from ._resnet import (
    BasicBlock as BasicBlock,
    Bottleneck as Bottleneck,
    ResNet as ResNet,
    resnet18 as resnet18,
    resnet34 as resnet34,
    resnet50 as resnet50,
)
from ._vit import (
    Block as Block,
    PatchEmbed as PatchEmbed,
    VisionTransformer as VisionTransformer,
    vit_small as vit_small,
    vit_tiny as vit_tiny,
)
