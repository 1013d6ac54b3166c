"""PoseTrack keypoint conventions and image statistics (SPEC §7, §8).

The library's own constants: configs import them from here, never the reverse.
"""

# The 17 slots of PoseTrack18/21 (and of converted PoseTrack17). Ears are never annotated.
JOINT_NAMES = (
    'nose', 'head_bottom', 'head_top', 'left_ear', 'right_ear',
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle',
)
NUM_JOINTS = len(JOINT_NAMES)
FLIP_PAIRS = ((3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
UPPER_BODY_JOINTS = tuple(range(11))  # 0..10: head, shoulders, elbows, wrists.
LOWER_BODY_JOINTS = tuple(range(11, 17))

# poseval's 15 joints, in its order, and the PoseTrack slot each one is read from.
POSEVAL_JOINT_NAMES = (
    'right_ankle', 'right_knee', 'right_hip', 'left_hip', 'left_knee', 'left_ankle',
    'right_wrist', 'right_elbow', 'right_shoulder', 'left_shoulder', 'left_elbow',
    'left_wrist', 'neck', 'nose', 'head_top',
)
# neck is head_bottom.
POSEVAL_FROM_POSETRACK = (16, 14, 12, 11, 13, 15, 10, 8, 6, 5, 7, 9, 1, 0, 2)
# Summary columns of the poseval table, as indices into POSEVAL_JOINT_NAMES.
POSEVAL_COLUMNS = (
    ('Head', (12, 13, 14)),
    ('Shou', (8, 9)),
    ('Elb', (7, 10)),
    ('Wri', (6, 11)),
    ('Hip', (2, 3)),
    ('Knee', (1, 4)),
    ('Ankl', (0, 5)),
)
# The printed table's columns: the summary groups, then their mean over the 15 joints.
SUMMARY_COLUMNS = tuple(name for name, _ in POSEVAL_COLUMNS) + ('Total',)

# Skeleton edges (PoseTrack slot pairs) for drawing overlays and rendering synthetic people.
SKELETON = (
    (0, 1), (1, 2), (1, 5), (1, 6), (5, 7), (7, 9), (6, 8), (8, 10),
    (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14), (14, 16),
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_STD = 200.0  # Box scale unit (pixels), as in the HRNet/DCPose code bases.
