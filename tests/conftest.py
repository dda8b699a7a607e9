import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# No test downloads anything: pretrained weights come only from a test's own hub cache. The tests
# of the download itself (test_download.py) turn this off and serve files on 127.0.0.1.
os.environ["WNCONVERT_OFFLINE"] = "1"
