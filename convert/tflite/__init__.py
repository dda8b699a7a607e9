"""TensorFlow Lite int8 files: the arithmetic (:mod:`.arith`), the flatbuffer writer/reader
(:mod:`.flatbuf`) and the integer reference that executes a .tflite (:mod:`.reference`)."""
