"""LeNet-5 (LeCun et al., 1998) as in the course notes: two 5x5 convolutions with ReLU and 2x2 average
pooling, then 120, 84 and `num_classes` units. 61,706 parameters for 1 input channel and 10 classes, on 32x32
inputs (28x28 MNIST padded by 2 on each side)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.conv import Conv2d
from ..nn.pooling import AvgPool2d


class LeNet5(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv1 = Conv2d(in_channels, 6, 5)
        self.pool1 = AvgPool2d(2, stride=2)
        self.conv2 = Conv2d(6, 16, 5)
        self.pool2 = AvgPool2d(2, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            raise ValueError(
                f"LeNet-5 expects 32x32 inputs (pad 28x28 MNIST by 2: torch.nn.functional.pad(x, (2, 2, 2, 2))), "
                f"got shape {tuple(x.shape)}"
            )
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def lenet5(num_classes=10, in_channels=1):
    """LeNet-5 for 32x32 inputs: conv 5x5 in->6, avgpool 2, conv 5x5 6->16, avgpool 2, fc 400->120->84->classes."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
