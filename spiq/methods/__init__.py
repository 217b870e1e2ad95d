"""The quantization methods, registered by name in `registry`. Importing the package registers
them all, in the order the app lists them."""
import spiq.methods.spiq  # noqa: F401
import spiq.methods.static  # noqa: F401
import spiq.methods.calibrated  # noqa: F401
import spiq.methods.dynamic  # noqa: F401
import spiq.methods.liu_ptq  # noqa: F401
