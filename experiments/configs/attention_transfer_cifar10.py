"""Zagoruyko & Komodakis (2017), "Paying More Attention to Attention", CIFAR-10 (WRN-16-2 -> WRN-16-1).

Commands:
    python experiments/attention_transfer_cifar10.py --workdir runs/at_cifar10            # full: tfds:cifar10, GPU/TPU
    python experiments/attention_transfer_cifar10.py --local --workdir runs/at_local      # substitute, 2-core CPU
    python experiments/attention_transfer_cifar10.py --smoke --workdir /tmp/at_smoke      # CI, seconds

The paper's numbers (test error, median of 5 runs): WRN-16-1 student alone 8.77%, with activation-based
attention transfer (F^2_sum, beta = 1000, three group outputs) 7.93%; WRN-16-2 teacher 6.31%.

Full: the paper's recipe (SGD, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr 0.1 x 0.2 at
epochs 60, 120, 160; random crops from 4-pixel zero padding and horizontal flips; per-channel standardization).
Local: the substitute task "colour-mnist5k-16" (see the script's docstring), the same networks and loss.
"""
import ml_collections


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "tfds:cifar10"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.substitute = ""  # "" = the dataset as is; "colour16" = the local substitute built from mnist5k
    c.train_limit = 0  # keep only the first n training examples (0 = all)
    c.seed = 0
    c.eval_batch_size = 1000  # divides by 1, 2, 4, 8 devices
    c.teacher = ml_collections.ConfigDict(dict(depth=16, width=2))
    c.student = ml_collections.ConfigDict(dict(depth=16, width=1))
    c.train = ml_collections.ConfigDict(dict(
        epochs=200, batch_size=128, learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
        decay_epochs=(60, 120, 160), decay_factor=0.2, crop_pad=4, flip=True))
    # beta / 2 * sum_j mean_{h,w} (Q_s/||Q_s|| - Q_t/||Q_t||)^2 over the outputs of the three groups
    c.at_beta = 1000.0
    c.at_p = 2.0

    if variant == "local":
        c.dataset = "mnist5k"
        c.substitute = "colour16"
        c.train.epochs = 10
        c.train.batch_size = 64
        c.train.learning_rate = 0.05
        c.train.decay_epochs = (5, 8)
        c.train.crop_pad = 2
        c.train.flip = False  # digits are not mirror-symmetric
    elif variant == "smoke":
        c.dataset = "mnist5k"
        c.substitute = "colour16"
        c.train_limit = 256
        c.train.epochs = 1
        c.train.batch_size = 64
        c.train.learning_rate = 0.05
        c.train.decay_epochs = ()
        c.train.crop_pad = 2
        c.train.flip = False
        c.teacher.depth = 10
        c.student.depth = 10
        c.eval_batch_size = 200
    elif variant != "full":
        raise ValueError(f"variant={variant!r} is not known; use full, local or smoke")
    return c
