"""Private and robust distillation: PATE (Papernot et al. 2017, 2018) and adversarial robustness of teachers
and students (Madry et al. 2018; defensive distillation, Papernot et al. 2016).

Commands:
    python experiments/private_and_robust.py --workdir runs/private_and_robust            # full: MNIST, accelerator
    python experiments/private_and_robust.py --local --workdir runs/private_and_robust_local  # 2-core CPU, minutes
    python experiments/private_and_robust.py --smoke --workdir /tmp/private_smoke        # CI, seconds

Part (a), PATE: the training split is the private data, cut into disjoint shards, one per teacher
(`pate.num_teachers`, trained together by `privacy.train_ensemble`); the test split is halved as in both PATE
papers: the first half is the student's unlabelled public data (the first `pate.queries` of it are sent to
the teachers), the second half evaluates the student. Noise levels are given as fractions of the number of
teachers (PATE 2018's MNIST setting, 250 teachers, T = 200, sigma1 = 150, sigma2 = 40, is threshold 0.8,
sigma1 0.6, sigma2 0.16). Prints one line per ensemble and per student, then the table of student accuracy
against epsilon (delta = `delta`, data-independent RDP bound) beside the published MNIST numbers.

Part (b), robustness: a SeedCNN teacher, the same teacher trained on PGD examples (teacher.adversarial=pgd),
defensively distilled students (cnn-defensive, per `robust.defensive_temperatures`, each from the T=1 teacher
and from the teacher at temperature T) and a standard distilled student (cnn-kd), each with clean / FGSM /
PGD accuracy, PGD on logits/T and transferred PGD, and the saliency max-sensitivity, IG deletion AUC and IG
and saliency Spearman agreement with the standard teacher's maps. In the --local run (digits, 2-core CPU)
the students of the T-teacher keep 0.57-0.63 (T=20) and 0.87-0.91 (T=100) under white-box FGSM/PGD at
eps=0.5 but fall to ~0 under PGD on logits/T (gradient masking); those of the T=1 teacher are no more
robust than cnn-kd.

Variants: full = the papers' MNIST (tfds:mnist, 60000 private / 5000 public / 5000 evaluation images,
250 teachers as in both papers, SmallCNN teachers and students), an accelerator, not run on the CPU box;
local = Fashion-MNIST (falls back to mnist5k when its IDX files are missing) with 100 and 250 MLP
teachers for (a), digits for (b), about 12 minutes on 2 CPU cores (PATE ~8.5, robustness ~2.5); smoke =
digits with 10 teachers and small models (about 35 s).
"""
import ml_collections


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.parts = "pate,robust"  # which parts run (--parts)
    c.eval_batch_size = 500

    # ------------------------------------------------------------------ (a) PATE
    c.pate = ml_collections.ConfigDict(dict(
        dataset="tfds:mnist",
        fallback_dataset="",  # used when `dataset`'s files are missing ("" = fail)
        test_fraction=0.2,  # only for datasets without a test split (digits, mnist5k)
        num_teachers=(250,),  # both papers' MNIST ensembles
        teacher_model="cnn",  # "cnn" (models.SmallCNN) or "mlp" (models.MLP with teacher_hidden)
        teacher_hidden=(256,),
        teacher_epochs=40,  # epochs over each teacher's own shard
        teacher_batch_size=32,  # per teacher (clipped to the smallest shard)
        teacher_learning_rate=1e-3,
        public_fraction=0.5,  # the first half of the test split is public, the second evaluates
        queries=(100, 1000),  # public queries sent to the teachers; PATE 2017's MNIST students used 100 and 1000
        # GNMax noise std as a fraction of the number of teachers (PATE 2018 MNIST: sigma2 = 40 of 250 = 0.16)
        gnmax_sigma_fractions=(0.04, 0.08, 0.16, 0.32),
        # Confident GNMax (PATE 2018 Algorithm 1), as fractions of the number of teachers: T = 200, sigma1 = 150,
        # sigma2 = 40 of 250 teachers
        confident_threshold_fraction=0.8, confident_sigma1_fraction=0.6, confident_sigma2_fraction=0.16,
        delta=1e-5,
        student_model="cnn",  # trained with plain optax on the (answered) noisy labels
        student_hidden=(256,),
        student_epochs=100,
        student_batch_size=64,
        student_learning_rate=1e-3,
        # non-private references trained on all private data: the student's and the teachers' architectures
        baseline_epochs=20,
        baseline_batch_size=128,
    ))

    # ------------------------------------------------------------------ (b) robustness
    c.robust = ml_collections.ConfigDict(dict(
        dataset="tfds:mnist",
        test_fraction=0.2,
        train_limit=0,
        teacher_kind="seed_cnn",  # the article's teacher; "cnn" (SmallCNN) makes the smoke run compile less
        teacher_epochs=20,
        student_epochs=20,
        batch_size=64,
        # Madry et al.'s MNIST budget is 0.3 in [0, 1] pixels, about 1.0 standardized unit (std 0.31)
        adversarial_epsilon=1.0,
        adversarial_steps=7,
        kd_temperature=4.0,
        kd_alpha=0.9,
        defensive_temperatures=(20.0, 100.0),  # Papernot et al. 2016 used T = 20..100
        attack_epsilons=(0.5, 1.0),  # L-inf, standardized input units
        pgd_steps=20,
        attack_images=1000,  # class-stratified test images attacked
        explain_images=200,  # class-stratified test images explained
        ig_steps=64,
        faithfulness_steps=16,
        sensitivity_radius=0.1,
    ))

    if variant == "local":
        p = c.pate
        p.dataset = "fashion_mnist"  # 60000 private, 5000 public, 5000 evaluation images
        p.fallback_dataset = "mnist5k"
        p.num_teachers = (100, 250)
        p.teacher_model = "mlp"
        p.teacher_hidden = (256,)
        p.teacher_epochs = 30
        p.teacher_batch_size = 24
        p.queries = (1000,)
        p.student_epochs = 40
        p.baseline_epochs = 3
        r = c.robust
        r.dataset = "digits"  # 1438 train / 359 test 8x8 images
        r.teacher_epochs = 15
        r.student_epochs = 20
        r.adversarial_epsilon = 0.5
        r.adversarial_steps = 5
        r.attack_epsilons = (0.25, 0.5)
        r.pgd_steps = 10
        r.attack_images = 359
        r.explain_images = 100
    elif variant == "smoke":
        c.eval_batch_size = 200
        p = c.pate
        p.dataset = "digits"
        p.num_teachers = (10,)
        p.teacher_model = "mlp"
        p.teacher_hidden = (32,)
        p.teacher_epochs = 20
        p.teacher_batch_size = 16
        p.teacher_learning_rate = 3e-3
        p.queries = (100,)
        p.gnmax_sigma_fractions = (0.1, 0.3, 1.0)
        p.student_model = "mlp"
        p.student_hidden = (32,)
        p.student_epochs = 20
        p.student_batch_size = 32
        p.student_learning_rate = 3e-3
        p.baseline_epochs = 5
        r = c.robust
        r.dataset = "digits"
        r.train_limit = 256
        r.teacher_kind = "cnn"
        r.teacher_epochs = 1
        r.student_epochs = 1
        r.batch_size = 32
        r.adversarial_epsilon = 0.5
        r.adversarial_steps = 2
        r.defensive_temperatures = (20.0,)
        r.attack_epsilons = (0.5,)
        r.pgd_steps = 2
        r.attack_images = 32
        r.explain_images = 8
        r.ig_steps = 4
        r.faithfulness_steps = 4
    elif variant != "full":
        raise ValueError(f"variant={variant!r} is not known; use full, local or smoke")
    return c
