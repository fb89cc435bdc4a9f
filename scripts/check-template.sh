#!/usr/bin/env bash
# template.yaml checks that need no AWS account: cfn-lint and `sam validate --lint`.
set -euo pipefail
cd "$(dirname "$0")/.."
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1} AWS_REGION=${AWS_REGION:-us-east-1}
export SAM_CLI_TELEMETRY=0
cfn-lint template.yaml
echo "ok   cfn-lint template.yaml"
sam validate --lint --template-file template.yaml --region "$AWS_DEFAULT_REGION"
echo "ok   sam validate --lint"
